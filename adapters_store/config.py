"""StoreConfig: the adapter store's limits and options (one validated dataclass)."""

from __future__ import annotations

from dataclasses import dataclass, field

MIB = 2**20
GIB = 2**30


@dataclass(frozen=True)
class StoreConfig:
    """Limits of the adapter store.

    max_adapter_bytes bounds config + weights of one adapter; quota_bytes bounds the sum of
    all stored adapters (every version, counted by declared size). host_cache_bytes is the
    host-memory LRU budget of loaded (float32) adapters; it should exceed the largest loaded
    adapter or that adapter is loaded on every use. allowed_register_roots are the directories
    `register_path` may read from (empty: registration from paths is refused); adapter_sources
    are the s3:// prefixes it may import from. registry_url / blobs_url choose shared backends.
    """

    max_lora_rank: int = 64
    max_adapter_bytes: int = GIB
    quota_bytes: int = 20 * GIB
    host_cache_bytes: int = GIB
    allowed_register_roots: tuple[str, ...] = ()
    max_header_bytes: int = MIB
    max_config_bytes: int = MIB
    max_chunk_bytes: int = MIB
    max_chat_template_bytes: int = 256 * 1024                # an adapter's own chat template (text)
    max_tokenizer_bytes: int = 64 * MIB                      # each of an adapter's tokenizer files (resized vocabulary)
    load_threads: int = 2
    busy_timeout_ms: int = 30_000
    # Shared backends (docs/adapter-store.md): "" = SQLite file / directory under the store root.
    registry_url: str = field(default="", repr=False)       # postgresql://... (may hold a password)
    blobs_url: str = ""                                     # s3://bucket/prefix
    blob_cache_bytes: int = 4 * GIB                         # local read-through cache of remote blobs
    adapter_sources: tuple[str, ...] = ()                   # s3:// prefixes register_path may import from
    registry_pool_size: int = 8
    backend_timeout_s: float = 10.0
    stale_delete_s: float = 600.0                           # shared registry: DELETING rows older -> finished

    def __post_init__(self) -> None:
        for name in ("max_lora_rank", "max_adapter_bytes", "quota_bytes", "max_header_bytes",
                     "max_config_bytes", "max_chunk_bytes", "max_chat_template_bytes", "max_tokenizer_bytes", "load_threads", "busy_timeout_ms"):
            if getattr(self, name) < 1:
                raise ValueError(f"StoreConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.host_cache_bytes < 0:
            raise ValueError(f"StoreConfig.host_cache_bytes must be >= 0, got {self.host_cache_bytes}")
        object.__setattr__(self, "allowed_register_roots", tuple(str(r) for r in self.allowed_register_roots))
        object.__setattr__(self, "adapter_sources", tuple(str(s) for s in self.adapter_sources))
        if self.blob_cache_bytes < 0 or self.backend_timeout_s <= 0 or self.stale_delete_s < 0:
            raise ValueError("StoreConfig: blob_cache_bytes and stale_delete_s must be >= 0, backend_timeout_s > 0")

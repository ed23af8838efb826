"""Choose and open the store's two backends from URLs (see docs/adapter-store.md).

registry: "" -> SQLite file `<root>/registry.sqlite3`; `postgresql://user:pass@host:port/db`
          -> PostgreSQL. blobs: "" -> directory `<root>/blobs`; `s3://bucket/prefix` -> S3-compatible
object store (with a local read-through cache under `<root>/cache/blobs`). Whatever the
backends, `<root>` holds this server's staging area and caches.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .blobs import BlobStore
from .config import StoreConfig
from .errors import StoreUnavailable
from .registry import Registry, SqlRegistry
from .urls import REGISTRY_SCHEMES, parse_s3_url, redact_url


@dataclass
class Backends:
    """An opened registry and blob store (close() both when done)."""

    registry: SqlRegistry
    blobs: Any                                   # BlobStore | S3BlobStore

    @property
    def shared(self) -> bool:
        """True when other servers may use the same registry or blobs."""
        return self.registry.shared or self.blobs.shared

    def close(self) -> None:
        self.registry.close()
        self.blobs.close()


def check_urls(registry_url: str, blobs_url: str) -> list[str]:
    """One line per malformed backend URL (for start-up config checks)."""
    problems = []
    if registry_url and registry_url.split("://", 1)[0] not in REGISTRY_SCHEMES:
        problems.append(f"--store-registry {redact_url(registry_url)!r}: expected postgresql://user:pass@host:port/db "
                        f"(or leave it empty for the SQLite file under --store)")
    if blobs_url:
        try:
            parse_s3_url(blobs_url)
        except ValueError as error:
            problems.append(f"--store-blobs: {error} (or leave it empty for the directory under --store)")
    return problems


def open_registry(url: str, root: Path, config: StoreConfig) -> SqlRegistry:
    if not url:
        return Registry(Path(root) / "registry.sqlite3", config.busy_timeout_ms)
    if url.split("://", 1)[0] not in REGISTRY_SCHEMES:
        raise ValueError(check_urls(url, "")[0])
    from .registry_pg import PostgresRegistry

    return PostgresRegistry(url, pool_size=config.registry_pool_size, timeout_s=config.backend_timeout_s)


def open_blobs(url: str, root: Path, config: StoreConfig):
    if not url:
        return BlobStore(Path(root))
    from .blobs_s3 import S3BlobStore, s3_client

    blobs = S3BlobStore(url, Path(root) / "cache" / "blobs", config.blob_cache_bytes,
                        client_factory=lambda: s3_client(config.backend_timeout_s))
    blobs.check()
    return blobs


def open_backends(root: Path, config: StoreConfig) -> Backends:
    """Open (and migrate) the registry, then the blob store; StoreUnavailable names the failing URL."""
    Path(root).mkdir(parents=True, exist_ok=True)
    registry = open_registry(config.registry_url, root, config)
    try:
        blobs = open_blobs(config.blobs_url, root, config)
    except BaseException:
        registry.close()
        raise
    return Backends(registry, blobs)


__all__ = ["Backends", "StoreUnavailable", "check_urls", "open_backends", "open_blobs", "open_registry"]

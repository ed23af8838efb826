"""Helpers for adapter store tests: a fake base, real PEFT adapter files, upload, snapshots."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import save, save_file

from loraplex.adapters_store.config import StoreConfig
from loraplex.adapters_store.paths import CONFIG_NAME, WEIGHTS_NAME
from loraplex.adapters_store.store import AdapterStore
from loraplex.adapters_store.types import BaseSpec
from loraplex.adapters_store.upload import UploadMeta

HIDDEN, KV, INTERMEDIATE = 64, 32, 128
FAKE_BASE = BaseSpec(
    fingerprint="llama:2x64:kv32:ffn128:none", architecture="LlamaForCausalLM", num_layers=2,
    module_shapes={"q_proj": (HIDDEN, HIDDEN), "k_proj": (HIDDEN, KV), "v_proj": (HIDDEN, KV),
                   "o_proj": (HIDDEN, HIDDEN), "gate_proj": (HIDDEN, INTERMEDIATE),
                   "up_proj": (HIDDEN, INTERMEDIATE), "down_proj": (INTERMEDIATE, HIDDEN)},
    vocab_size=96)
VOCAB = 96
EMBED = "base_model.model.model.embed_tokens"
LM_HEAD = "base_model.model.lm_head"
PARENTS = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
           "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def tensor_key(layer: int, module: str, factor: str) -> str:
    return f"base_model.model.model.layers.{layer}.{PARENTS[module]}.{module}.lora_{factor}.weight"


def adapter_config(rank: int = 4, alpha: float = 8, targets=("q_proj", "v_proj"), **extra) -> dict:
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": list(targets),
              "use_rslora": False, "base_model_name_or_path": "fake/llama-tiny", "bias": "none",
              "task_type": "CAUSAL_LM", "lora_dropout": 0.0}
    config.update(extra)
    return config


def adapter_tensors(rank: int = 4, targets=("q_proj", "v_proj"), seed: int = 0,
                    dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(FAKE_BASE.num_layers):
        for module in targets:
            in_features, out_features = FAKE_BASE.module_shapes[module]
            tensors[tensor_key(layer, module, "A")] = torch.randn(rank, in_features, generator=generator).to(dtype)
            tensors[tensor_key(layer, module, "B")] = torch.randn(out_features, rank, generator=generator).to(dtype)
    return tensors


def adapter_bytes(rank: int = 4, seed: int = 0, config: dict | None = None,
                  tensors: dict | None = None, **config_extra) -> tuple[bytes, bytes]:
    """(adapter_config.json bytes, adapter_model.safetensors bytes)."""
    config = config if config is not None else adapter_config(rank=rank, **config_extra)
    tensors = tensors if tensors is not None else adapter_tensors(rank=rank, seed=seed,
                                                                  targets=tuple(config["target_modules"]))
    return json.dumps(config).encode(), save(tensors)


def write_adapter(directory: Path, rank: int = 4, seed: int = 0, config: dict | None = None,
                  tensors: dict | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    config = config if config is not None else adapter_config(rank=rank)
    tensors = tensors if tensors is not None else adapter_tensors(rank=rank, seed=seed,
                                                                  targets=tuple(config["target_modules"]))
    (directory / CONFIG_NAME).write_text(json.dumps(config))
    save_file(tensors, str(directory / WEIGHTS_NAME))
    return directory


def make_store(root: Path, base: BaseSpec = FAKE_BASE, **overrides) -> AdapterStore:
    """A store under `root`; with the shared backends when LORAPLEX_TEST_STORE_* are set (conftest)."""
    settings = dict(max_lora_rank=16, max_adapter_bytes=4 * 2**20, quota_bytes=64 * 2**20,
                    host_cache_bytes=8 * 2**20, allowed_register_roots=(str(root.parent / "adapters"),),
                    registry_url=os.environ.get("LORAPLEX_TEST_STORE_REGISTRY", ""),
                    blobs_url=os.environ.get("LORAPLEX_TEST_STORE_BLOBS", ""), stale_delete_s=0.0)
    settings.update(overrides)
    return AdapterStore(root, StoreConfig(**settings), base)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def upload(store: AdapterStore, name: str, config_bytes: bytes, weights_bytes: bytes, owner: str | None = None,
           chunk_bytes: int = 4096, allow_base_mismatch: bool = False):
    meta = UploadMeta(name=name, config_size=len(config_bytes), config_sha256=sha256(config_bytes),
                      weights_size=len(weights_bytes), weights_sha256=sha256(weights_bytes), owner=owner,
                      allow_base_mismatch=allow_base_mismatch)
    session = store.begin_upload(meta)
    try:
        for start in range(0, len(config_bytes), chunk_bytes):
            session.write(CONFIG_NAME, config_bytes[start:start + chunk_bytes])
        for start in range(0, len(weights_bytes), chunk_bytes):
            session.write(WEIGHTS_NAME, weights_bytes[start:start + chunk_bytes])
        return session.commit()
    finally:
        session.abort()


def snapshot(store: AdapterStore) -> tuple[frozenset[str], tuple]:
    """(every blob and staged file, every registry row): equal before and after = nothing stored."""
    tmp = store.root / "tmp"
    files = frozenset(str(p.relative_to(store.root)) for p in tmp.rglob("*") if p.is_file()) if tmp.exists() \
        else frozenset()
    return files | blob_digests(store), tuple(store._registry.all()) + tuple(store._registry.names())


def blob_digests(store: AdapterStore) -> frozenset[str]:
    """Digests of every blob in the store's blob backend."""
    return frozenset(store._blobs.list_digests())


def corrupt_blob(store: AdapterStore, digest: str, data: bytes = b"corrupted") -> None:
    """Overwrite a stored blob behind the store's back (and drop any local cached copy)."""
    from loraplex.adapters_store.blobs_s3 import S3BlobStore

    if isinstance(store._blobs, S3BlobStore):
        location = store._blobs.location
        store._blobs._client.put_object(Bucket=location.bucket, Key=store._blobs._key(digest), Body=data)
        store._blobs.cache.drop(digest)
    else:
        store._blobs.path(digest).write_bytes(data)


def remove_blob(store: AdapterStore, digest: str) -> None:
    store._blobs.remove(digest)


def staging_leftovers(root: Path) -> list[str]:
    """Files in tmp/ other than nothing (an aborted session must leave none)."""
    return [str(p.relative_to(root)) for p in (root / "tmp").rglob("*")] if (root / "tmp").exists() else []


def verify_blobs(store: AdapterStore) -> None:
    """Every blob's content hashes to its name."""
    for digest in store._blobs.list_digests():
        assert sha256(store._blobs.read(digest)) == digest, f"corrupt blob {digest}"

"""Adapter store records <-> AdapterService protos."""

from __future__ import annotations

from typing import Any

from ...v1 import adapters_pb2 as pb
from .errors import FieldViolation, invalid_argument

_TOKENIZER_NAMES = {pb.ADAPTER_FILE_TOKENIZER: "tokenizer.json", pb.ADAPTER_FILE_TOKENIZER_CONFIG: "tokenizer_config.json",
                    pb.ADAPTER_FILE_SPECIAL_TOKENS_MAP: "special_tokens_map.json"}
_STATES = {"READY": pb.ADAPTER_STATE_READY, "QUARANTINED": pb.ADAPTER_STATE_QUARANTINED,
           "DELETING": pb.ADAPTER_STATE_DELETING}


def adapter_info(record: Any) -> pb.AdapterInfo:
    """An AdapterInfo from a store record."""
    config = record.config
    info = pb.AdapterInfo(
        adapter_id=record.name, version=record.version, sha256=record.sha256, size_bytes=record.size_bytes,
        rank=config.rank, lora_alpha=config.lora_alpha, use_rslora=config.use_rslora,
        target_modules=list(config.target_modules), dtype=record.dtype or "", peft_type=config.peft_type,
        base_model=config.base_model or "", base_fingerprint=config.base_fingerprint or "",
        owner=record.owner or "", state=_STATES.get(str(getattr(record.state, "name", record.state)).upper(),
                                                    pb.ADAPTER_STATE_UNSPECIFIED),
        has_chat_template=bool(getattr(record, "chat_template", None)),
        vocab_size=int(getattr(record, "vocab_size", 0) or 0))
    info.created_at.FromNanoseconds(int(record.created_at * 1e9))
    return info


def upload_metadata(meta: pb.UploadMetadata, tenant: str | None) -> Any:
    """The store's UploadMeta for an upload by `tenant`."""
    from ...adapters_store.upload import UploadMeta

    if meta.private and tenant is None:
        raise invalid_argument([FieldViolation("metadata.private",
                                               "private adapters need a key with a tenant ('tenant:key')")])
    return UploadMeta(name=meta.adapter_id, config_size=meta.config_size, config_sha256=meta.config_sha256,
                      weights_size=meta.weights_size, weights_sha256=meta.weights_sha256,
                      owner=tenant if meta.private else None, allow_base_mismatch=meta.allow_base_mismatch,
                      tenant=tenant, chat_template_size=meta.chat_template_size,
                      chat_template_sha256=meta.chat_template_sha256,
                      tokenizer_files=tuple((_TOKENIZER_NAMES[f.file], f.size, f.sha256) for f in meta.tokenizer_files
                                            if f.file in _TOKENIZER_NAMES))

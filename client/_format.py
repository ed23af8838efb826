"""Human and JSON renderings of SDK results for the CLI."""

from __future__ import annotations

import dataclasses
import enum
import json
from datetime import datetime
from typing import Any

from .types import AdapterInfo, ServerInfo

ADAPTER_COLUMNS = ("ID", "VERSION", "RANK", "ALPHA", "TARGETS", "SIZE", "STATE", "OWNER", "CREATED")


def to_jsonable(value: Any) -> Any:
    """Dataclasses -> dicts, enums -> their value, datetimes -> ISO 8601."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, (list, tuple)):
        return [to_jsonable(item) for item in value]
    return value


def dumps(value: Any) -> str:
    return json.dumps(to_jsonable(value), ensure_ascii=False)


def human_bytes(count: int) -> str:
    size = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{count} B"


def _created(adapter: AdapterInfo) -> str:
    return adapter.created_at.strftime("%Y-%m-%d %H:%M") if adapter.created_at else "-"


def adapter_row(adapter: AdapterInfo) -> tuple[str, ...]:
    return (adapter.adapter_id, str(adapter.version), str(adapter.rank), f"{adapter.lora_alpha:g}",
            ",".join(adapter.target_modules) or "-", human_bytes(adapter.size_bytes), adapter.state.value,
            adapter.owner or "public", _created(adapter))


def table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in [header, *rows]]
    return "\n".join(lines)


def adapters_table(adapters: list[AdapterInfo]) -> str:
    if not adapters:
        return "no adapters (upload one with: loraplex adapters upload PATH --id NAME)"
    return table(ADAPTER_COLUMNS, [adapter_row(adapter) for adapter in adapters])


def key_values(pairs: list[tuple[str, Any]]) -> str:
    width = max(len(key) for key, _ in pairs)
    return "\n".join(f"{key + ':':<{width + 1}} {value}" for key, value in pairs)


def adapter_details(adapter: AdapterInfo) -> str:
    return key_values([
        ("id", adapter.adapter_id), ("version", adapter.version),
        ("versions", ", ".join(map(str, adapter.versions)) or str(adapter.version)),
        ("state", adapter.state.value), ("peft type", adapter.peft_type), ("rank", adapter.rank),
        ("lora alpha", f"{adapter.lora_alpha:g}"), ("rslora", adapter.use_rslora),
        ("targets", ", ".join(adapter.target_modules)), ("dtype", adapter.dtype),
        ("size", human_bytes(adapter.size_bytes)), ("sha256", adapter.sha256),
        ("base model", adapter.base_model or "-"), ("base fingerprint", adapter.base_fingerprint or "-"),
        ("owner", adapter.owner or "public"), ("created", _created(adapter)),
        ("vocabulary", f"{adapter.vocab_size} tokens, its own tokenizer" if adapter.vocab_size else "the base's")])


def server_details(info: ServerInfo) -> str:
    limits = info.limits
    return key_values([
        ("version", info.version), ("model", info.model), ("architecture", info.architecture),
        ("quantization", info.quantization), ("dtype", info.dtype), ("device", info.device),
        ("linear weights", human_bytes(info.linear_weight_bytes)), ("base fingerprint", info.base_fingerprint),
        ("cpu isa", info.cpu_isa or "-"), ("decode path", info.decode_path or "-"), ("linear kernels", "; ".join(info.linear_kernels) or "-"),
        ("auth", "on" if info.auth_enabled else "off"),
        ("max input tokens", limits.max_input_tokens), ("max total tokens", limits.max_total_tokens),
        ("max new tokens", limits.max_new_tokens), ("max loras", limits.max_loras),
        ("max lora rank", limits.max_lora_rank), ("max adapter size", human_bytes(limits.max_adapter_bytes))])

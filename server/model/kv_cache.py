"""Paged KV cache: per layer K and V tensors [num_blocks, block_size, num_kv_heads, head_dim].

Also sizes the cache from a memory budget given as bytes ("2GiB", "512MiB", "1000000") or as a
fraction of the memory still available ("0.3"): /proc/meminfo MemAvailable on the CPU,
`torch.cuda.mem_get_info` on CUDA.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import ModelConfig

LayerKVCache = tuple[torch.Tensor, torch.Tensor]   # (K, V), each [num_blocks, block_size, kv_heads, head_dim]

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_BUDGET_RE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*", re.ASCII)


@dataclass(frozen=True)
class MemoryBudget:
    """Exactly one of `num_bytes` (absolute) and `fraction` (of available memory) is set."""

    num_bytes: int | None = None
    fraction: float | None = None

    def resolve(self, available_bytes: int) -> int:
        if self.num_bytes is not None:
            return self.num_bytes
        return int(available_bytes * (self.fraction or 0.0))


def parse_memory_budget(value: str | int | float) -> MemoryBudget:
    """'2GiB', '512MiB', '1.5GB', '1000000' (bytes) or '0.3' (a fraction in (0, 1])."""
    text = str(value)
    match = _BUDGET_RE.fullmatch(text)
    unit = match.group(2).lower() if match else ""
    if not match or unit not in _UNITS:
        raise ValueError(f"KV cache memory {text!r} is not understood; use bytes with a unit "
                         "('2GiB', '512MiB', '1.5GB') or a fraction of free memory ('0.3')")
    number = float(match.group(1))
    if not unit and number <= 1.0:
        if number <= 0:
            raise ValueError(f"KV cache memory fraction {text!r} must be in (0, 1]")
        return MemoryBudget(fraction=number)
    if not unit and "." in match.group(1):
        raise ValueError(f"KV cache memory {text!r}: a plain number above 1 means bytes and must "
                         "be an integer; a fraction must be in (0, 1]")
    return MemoryBudget(num_bytes=int(number * _UNITS[unit]))


def available_memory_bytes(device: str | torch.device = "cpu") -> int:
    """Free memory on the device: CUDA's free bytes, or MemAvailable from /proc/meminfo."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError as error:
        raise ValueError(f"cannot read /proc/meminfo ({error}); give the KV cache size in bytes, "
                         "e.g. --kv-cache-memory 2GiB") from None
    raise ValueError("/proc/meminfo has no MemAvailable line; give the KV cache size in bytes, "
                     "e.g. --kv-cache-memory 2GiB")


def bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """Bytes one block takes across all layers, K and V together."""
    element_size = torch.empty(0, dtype=dtype).element_size()
    return 2 * config.num_layers * block_size * config.num_kv_heads * config.head_dim * element_size


def num_blocks_for_budget(budget: str | int | float, config: ModelConfig, block_size: int,
                          dtype: torch.dtype, device: str | torch.device = "cpu") -> int:
    """How many KV blocks fit in the budget (bytes, or a fraction of available memory)."""
    parsed = parse_memory_budget(budget)
    available = available_memory_bytes(device) if parsed.fraction is not None else 0
    return parsed.resolve(available) // bytes_per_block(config, block_size, dtype)


def allocate_kv_caches(config: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                       device: str | torch.device = "cpu") -> list[LayerKVCache]:
    """Zero-filled (K, V) per layer. Zeros matter: padded block-table entries point at block 0,
    and masked-out garbage (NaN) would otherwise leak through 0 * NaN."""
    shape = (num_blocks, block_size, config.num_kv_heads, config.head_dim)
    return [(torch.zeros(shape, dtype=dtype, device=device),
             torch.zeros(shape, dtype=dtype, device=device)) for _ in range(config.num_layers)]

"""Paged KV cache: per layer K and V tensors [num_blocks, block_size, num_kv_heads, head_dim].

Also turns a memory budget (memory_budget.py: bytes such as "2GiB", or a fraction "0.3" of the
memory still available: /proc/meminfo MemAvailable on the CPU, `torch.cuda.mem_get_info` on
CUDA) into blocks; kv_sizing.py decides the budget.
"""

from __future__ import annotations

import math
import mmap
from pathlib import Path

import torch

from .config import ModelConfig
from .memory_budget import MemoryBudget, parse_memory_budget  # noqa: F401  (re-exported)

LayerKVCache = tuple[torch.Tensor, torch.Tensor]   # (K, V), each [num_blocks, block_size, kv_heads, head_dim]


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
    and masked-out garbage (NaN) would otherwise leak through 0 * NaN.

    On the CPU each tensor lives in an anonymous memory map: the kernel hands out zero pages on
    first write, so resident memory grows with the blocks actually used, not the cache's size.
    """
    shape = (num_blocks, block_size, config.num_kv_heads, config.head_dim)
    if torch.device(device).type == "cpu":
        return [(_lazy_zeros(shape, dtype), _lazy_zeros(shape, dtype)) for _ in range(config.num_layers)]
    return [(torch.zeros(shape, dtype=dtype, device=device),
             torch.zeros(shape, dtype=dtype, device=device)) for _ in range(config.num_layers)]


def _lazy_zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zero CPU tensor whose pages are only backed once written (the tensor keeps the map)."""
    count = math.prod(shape)
    num_bytes = count * torch.empty(0, dtype=dtype).element_size()
    if num_bytes == 0:
        return torch.zeros(shape, dtype=dtype)
    region = mmap.mmap(-1, num_bytes)                 # anonymous, private, zero-filled on demand
    return torch.frombuffer(region, dtype=dtype, count=count).view(shape)

"""How many KV blocks to allocate, and why: the one place the KV cache is sized.

`auto` (the default) sizes the cache by what the configuration can use: every running sequence
(`max_num_seqs`) at its longest (`max_model_len`), plus a share on top for cached prompt
prefixes, and never more than a memory cap (bytes, or a fraction of the memory still
available). An explicit size (`2GiB`, or a fraction `0.3`) allocates exactly that much, as
before. On the CPU the cache's pages are only touched when a block is first written
(kv_cache.allocate_kv_caches), so a large cap costs address space, not resident memory.

The block manager and scheduler call `plan_kv_cache` for the block count; the prefix cache
passes its share (0 when prefix caching is off).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import ModelConfig
from .kv_cache import available_memory_bytes, bytes_per_block, parse_memory_budget

AUTO = "auto"


@dataclass(frozen=True)
class KVCacheDemand:
    """What the configuration can use: tokens per sequence, sequences, and the prefix share."""

    max_num_seqs: int
    max_model_len: int
    block_size: int
    prefix_share: float = 0.0      # extra blocks for cached prefixes, as a share of the demand

    @property
    def blocks_per_seq(self) -> int:
        return -(-self.max_model_len // self.block_size)

    @property
    def running_blocks(self) -> int:
        return self.max_num_seqs * self.blocks_per_seq

    @property
    def total_blocks(self) -> int:
        return self.running_blocks + int(self.running_blocks * self.prefix_share)


@dataclass(frozen=True)
class KVCachePlan:
    """The block count chosen and the numbers behind it (for the startup log and tests)."""

    num_blocks: int
    block_bytes: int                # one block across all layers, K and V
    block_size: int
    demand_blocks: int              # what the configuration can use (0: an explicit size)
    cap_bytes: int                  # the most the cache may take
    available_bytes: int | None     # free memory the cap was taken from (None: not read)
    capped: bool                    # True when the cap, not the demand, set num_blocks
    setting: str                    # the --kv-cache-memory value

    @property
    def num_bytes(self) -> int:
        return self.num_blocks * self.block_bytes

    def describe(self) -> str:
        """One line for the startup log: how big, and why."""
        size = f"{self.num_blocks} blocks of {self.block_size} tokens ({_gib(self.num_bytes)})"
        free = "" if self.available_bytes is None else f" of {_gib(self.available_bytes)} free"
        if not self.demand_blocks:
            return f"{size}: --kv-cache-memory {self.setting}{free}"
        demand = f"the configuration can use {self.demand_blocks} ({_gib(self.demand_blocks * self.block_bytes)})"
        if self.capped:
            return f"{size}: capped at --kv-cache-max-memory ({_gib(self.cap_bytes)}{free}); {demand}"
        return f"{size}: {demand}, within --kv-cache-max-memory ({_gib(self.cap_bytes)}{free})"


def plan_kv_cache(setting: str, max_memory: str, demand: KVCacheDemand, config: ModelConfig,
                  dtype: torch.dtype, device: str | torch.device = "cpu",
                  available_bytes: int | None = None) -> KVCachePlan:
    """Choose the number of KV blocks.

    setting: `auto` (by demand, within max_memory) or an explicit budget (bytes or fraction).
    available_bytes: free memory to take fractions of (read from the device when None).
    """
    block_bytes = bytes_per_block(config, demand.block_size, dtype)
    explicit = setting.strip().lower() != AUTO
    budget = parse_memory_budget(setting if explicit else max_memory)
    if budget.fraction is not None and available_bytes is None:
        available_bytes = available_memory_bytes(device)
    cap_bytes = budget.resolve(available_bytes or 0)
    cap_blocks = cap_bytes // block_bytes
    if explicit:
        return KVCachePlan(cap_blocks, block_bytes, demand.block_size, 0, cap_bytes, available_bytes,
                           False, setting)
    wanted = demand.total_blocks
    return KVCachePlan(min(wanted, cap_blocks), block_bytes, demand.block_size, wanted, cap_bytes,
                       available_bytes, wanted > cap_blocks, setting)


def _gib(num_bytes: int) -> str:
    if num_bytes >= 2**30:
        return f"{num_bytes / 2**30:.2f} GiB"
    return f"{num_bytes / 2**20:.1f} MiB"

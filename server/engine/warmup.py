"""Warm-up before the server reports SERVING: one base request, then one through an adapter.

The adapter request runs the whole adapter path (manager, slot pool, runner routing, the
LoRA delta kernels at a prefill and a decode shape) with a synthetic all-zero adapter, so on
CUDA the Triton kernels are compiled (and their launcher built, which needs a C compiler
and Python headers) before the first real request, and a broken toolchain fails the start
instead of the first adapter request. The zero adapter changes no logit: its tokens must
equal the base request's. Afterwards its slot is cleared and the stacks go back to rank 1.
"""

from __future__ import annotations

from typing import Callable

import torch

from ...adapters_store.types import LoadedAdapter, LoraConfigInfo
from ..lora.manager import AdapterManager
from ..lora.slot_pool import SlotPool
from .engine import LLMEngine
from .io import GenerationRequest
from .sequence import FinishReason, SamplingParams

WARMUP_ID = "loraplex-warmup"          # a valid adapter id; served by its own gateway
WARMUP_KEY = f"{WARMUP_ID}@0"
WARMUP_RANK = 16
_PROMPT = (1, 2, 3, 4, 5)

Log = Callable[[str], None]


def run_request(engine: LLMEngine, request_id: str, adapter_id: str | None = None) -> list[int]:
    """Run one short greedy request to the end; its generated token ids. Raises when the
    engine fails it (the engine isolates a failing forward pass to its requests)."""
    request = GenerationRequest(request_id=request_id, prompt_token_ids=_PROMPT, adapter_id=adapter_id,
                                sampling=SamplingParams(max_new_tokens=2, ignore_eos=True))
    engine.add_request(request)
    tokens: list[int] = []
    while engine.has_work():
        outputs, _stats = engine.step()
        for output in outputs:
            if output.request_id != request_id:
                continue
            tokens.extend(output.token_ids)
            if output.finish_reason is FinishReason.ERROR:
                raise RuntimeError(f"warm-up request {request_id} failed inside the engine "
                                   f"({getattr(output, 'error', None) or 'see the log above'}); "
                                   "the server cannot serve this path")
    return tokens


def zero_adapter(pool: SlotPool, rank: int) -> LoadedAdapter:
    """An adapter on every target module of the pool with all-zero A and B (delta 0)."""
    weights = {}
    for target in pool.targets:
        for name, out_features in zip(target.sub_names, target.out_sizes):
            weights[(target.layer_idx, name)] = (torch.zeros(rank, target.in_features),
                                                 torch.zeros(out_features, rank))
    names = tuple(sorted({name for (_, name) in weights}))
    config = LoraConfigInfo(rank=rank, lora_alpha=float(rank), use_rslora=False, target_modules=names)
    return LoadedAdapter(key=WARMUP_KEY, config=config, weights=weights, nbytes=0)


class _WarmupGateway:
    """The engine's adapter gateway for the warm-up: one zero adapter, no store."""

    def __init__(self, pool: SlotPool, adapter: LoadedAdapter):
        self.manager = AdapterManager(pool)     # its own counters: warm-up loads are not metrics
        self._adapter = adapter

    def resolve(self, ref: str, tenant: str | None) -> str:
        return WARMUP_KEY

    def release(self, key: str) -> None:
        pass

    def vocab_size(self, key: str) -> int:
        return 0                                # the warm-up adapter has the base's vocabulary

    def ready(self, key: str) -> bool:
        return True

    def prefetch(self, keys: list[str]) -> None:
        pass

    def take_failures(self) -> dict[str, str]:
        return {}

    def activate(self, keys: set[str]) -> dict[str, int]:
        return self.manager.activate(keys, lambda _key: self._adapter)


def warm_up(engine: LLMEngine, pool: SlotPool | None = None, log: Log = print) -> None:
    """Run the base path, then (with a pool) the adapter path; raise if the adapter path fails."""
    base_tokens = run_request(engine, "__warmup__")
    if pool is None:
        return
    rank = min(WARMUP_RANK, pool.max_lora_rank)
    gateway, engine.adapters = engine.adapters, _WarmupGateway(pool, zero_adapter(pool, rank))
    try:
        lora_tokens = run_request(engine, "__warmup_adapter__", adapter_id=WARMUP_ID)
        engine.adapters.manager.evict(WARMUP_KEY)
    finally:
        engine.adapters = gateway
    pool.shrink_to_loaded()
    log(f"[loraplex] warm-up: a request through a zero rank-{rank} adapter ran "
        f"({pool.ops.name} LoRA ops)")
    if lora_tokens != base_tokens:
        log(f"[loraplex] warning: the zero warm-up adapter changed greedy tokens ({base_tokens} -> "
            f"{lora_tokens}); the LoRA kernels ({pool.ops.name}) may be wrong on this device")

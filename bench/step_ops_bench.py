"""Where a decode step's time goes besides the GEMMs, measured inside the served step.

The engine serves decode steps through one native call (model/decode_stack.py). A bench build
of the same C++ sources (`native.load(timing=True)`, compiled with LORAPLEX_STACK_TIMING) times
each op class inside that call: the decoder's GEMMs, the norms, rotary + K/V write, attention
and SiLU·up. This script swaps that build's decode_stack into a default-model engine and decodes
a batch (32-token prompts, 32 new tokens, greedy, as section 1), summing the timers over the
pure-decode steps. The rest of a step (LM head GEMM, sampling, host work) is the step time
minus the timed ops.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

OPS = ("GEMMs", "norms", "rotary + K/V write", "attention", "SiLU·up")   # stack_timings() order


@dataclass(frozen=True)
class StepOps:
    batch: int
    step_ms: float               # mean decode step, as served
    ms: dict[str, float]          # mean per step inside the stack, by op class
    kv_bytes: float               # mean K and V bytes attention reads per step

    @property
    def rest_ms(self) -> float:
        """The step outside the stack's timed ops: LM head GEMM, sampling, host work."""
        return self.step_ms - sum(self.ms.values())

    @property
    def besides_gemms_ms(self) -> float:
        return sum(v for k, v in self.ms.items() if k != "GEMMs")

    @property
    def attention_gb_s(self) -> float:
        return self.kv_bytes / (self.ms["attention"] / 1e3) / 1e9


def _decode(engine, timing, prompts: list[list[int]], new_tokens: int) -> StepOps:
    from loraplex.server.engine.io import GenerationRequest
    from loraplex.server.engine.sequence import SamplingParams

    config = engine.runner.model.config
    sampling = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    for i, ids in enumerate(prompts):
        engine.add_request(GenerationRequest(request_id=f"ops-{time.monotonic_ns()}-{i}",
                                             prompt_token_ids=tuple(ids), sampling=sampling))
    totals, step_s, steps, keys = [0.0] * len(OPS), 0.0, 0, 0
    while engine.has_work():
        timing.stack_timings()                                     # reset
        started = time.perf_counter()
        _outputs, stats = engine.step()
        elapsed = time.perf_counter() - started
        seconds = timing.stack_timings()
        if stats.batch_tokens == stats.batch_size == len(prompts):
            totals = [t + s for t, s in zip(totals, seconds)]
            step_s, steps = step_s + elapsed, steps + 1
            keys += sum(len(ids) for ids in prompts) + steps * len(prompts)   # keys read this step
    per_key = 2 * config.num_layers * config.num_kv_heads * config.head_dim * 4            # K + V, fp32
    return StepOps(len(prompts), 1e3 * step_s / steps, {name: 1e3 * t / steps for name, t in zip(OPS, totals)},
                   keys * per_key / steps)


def run_step_ops(engine, prompts_by_batch: dict[int, list[list[int]]], new_tokens: int = 32,
                 rounds: int = 3) -> list[StepOps]:
    """Per batch size, the round with the fastest steps (after a 4-token warm-up)."""
    from loraplex.server.kernels import native

    stack = engine.runner.model.decode_stack
    if stack is None:
        raise RuntimeError("the step-ops bench needs the one-call decode stack (native kernels, dense or "
                           "fused quantized GEMMs)")
    timing = native.load(log=lambda _m: None, timing=True)
    served = stack.kernel
    stack.kernel = timing.decode_stack
    try:
        results = []
        for batch, prompts in prompts_by_batch.items():
            _decode(engine, timing, prompts, 4)
            runs = [_decode(engine, timing, prompts, new_tokens) for _ in range(rounds)]
            results.append(min(runs, key=lambda r: r.step_ms))
        return results
    finally:
        stack.kernel = served

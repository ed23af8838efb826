"""Each quantization backend: decode tok/s at batch 1 and 16 vs float32, weight bytes, GB/s.

Bytes per step are what one decode step streams: the decoder's linear weights in the form
the chosen decode kernel reads (`stream_bytes`: the fused kernels' packed codes and scales,
or the library's stored data) plus the float32 LM head; effective GB/s = bytes per step x
steps per second at batch 1. The chosen linear kernels (measured at start-up) are listed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from common import prompt_ids
from engine_bench import engine_decode_tok_s, make_engine

CPU_BACKENDS = ("none", "bnb-nf4", "bnb-fp4", "bnb-int8", "hqq-2bit", "hqq-3bit", "hqq-4bit",
                "hqq-8bit", "eetq")
BATCHES = (1, 16)


@dataclass(frozen=True)
class BackendResult:
    method: str
    tok_s: dict[int, float]        # batch -> decode tok/s
    weight_bytes: int              # resident decoder linear weights
    step_bytes: int                # bytes one decode step streams (decoder linears + LM head)
    kernels: str                   # decode kernel of each layer shape, e.g. "native x4"

    def gb_s(self, batch: int = 1) -> float:
        return self.step_bytes * self.tok_s[batch] / batch / 1e9


def cpu_isa_line() -> str:
    """The CPU's instruction set as torch sees it, and the one the fused kernels use."""
    from loraplex.server.kernels.registry import KernelSet

    kernels = KernelSet.resolve("auto", torch.float32, "cpu", log=lambda _m: None)
    fused = kernels.native.quant_isa() if kernels.native is not None else "not built"
    return f"torch CPU capability {torch.backends.cpu.get_cpu_capability()}, fused kernels {fused}"


def step_bytes(model) -> int:
    """Bytes one decode step streams: every decoder linear as its decode kernel reads it, and the
    float32 LM head."""
    linears = sum(proj.base.stream_bytes() for proj in model.lora_targets())
    return linears + model.lm_head.weight_bytes()


def _decode_kernels(model) -> str:
    """Kernel name x GEMM calls per decode step at batch 1 (a joined ConcatLinear is one call)."""
    names: dict[str, int] = {}
    for proj in model.lora_targets():
        joined = getattr(proj.base, "joined_native", lambda _rows: None)(1) is not None
        parts = [proj.base.parts[0]] if joined else getattr(proj.base, "parts", [proj.base])
        for part in parts:
            first = part.route_names[0][1] if part.route_names else "library"
            names[first] = names.get(first, 0) + 1
    return ", ".join(f"{name} x{count}" for name, count in sorted(names.items()))


def run_backend_bench(model_dir: Path, new_tokens: int = 16, prompt_len: int = 32,
                      methods=CPU_BACKENDS, batches=BATCHES, rounds: int = 3, log=print) -> list[BackendResult]:
    """Every backend's engine is built first, then decoded in `rounds` interleaved rounds (best
    of each): run one after another, the VM's drift between minutes entered the ratios to float32."""
    from transformers import AutoTokenizer

    prompts = prompt_ids(AutoTokenizer.from_pretrained(model_dir), max(batches), prompt_len)
    engines = {method: make_engine(model_dir, quantize=method, kv_cache_memory="512MiB") for method in methods}
    best = {method: {batch: 0.0 for batch in batches} for method in methods}
    for _ in range(rounds):
        for method, engine in engines.items():
            for batch in batches:
                best[method][batch] = max(best[method][batch],
                                          engine_decode_tok_s(engine, prompts[:batch], new_tokens))
    results = []
    for method, engine in engines.items():
        model = engine.runner.model
        result = BackendResult(method, best[method], model.linear_weight_bytes(), step_bytes(model),
                               _decode_kernels(model))
        log(f"  {method:9s}: " + ", ".join(f"b{b} {t:7.1f} tok/s" for b, t in result.tok_s.items())
            + f", weights {result.weight_bytes / 2**20:6.1f} MiB, step {result.step_bytes / 2**20:6.1f} MiB,"
            f" {result.gb_s():5.1f} GB/s at b1, decode kernels {result.kernels}")
        results.append(result)
    return results

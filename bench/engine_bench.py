"""Decode throughput: loraplex engine vs transformers `generate` vs a dense-GEMM floor.

All three run in one process on the same prompts, batch sizes, dtype and machine. Decode
throughput excludes prefill: for the engine we time only steps after every prompt is in the
cache; for transformers we time generate(N) - generate(1).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from common import engine_step, prompt_ids, time_it


@dataclass(frozen=True)
class DecodeResult:
    batch: int
    engine_tok_s: float            # the engine as served (--linear-kernel auto: prepacked oneDNN)
    aten_engine_tok_s: float       # the same engine with --linear-kernel aten (F.linear / MKL)
    torch_ops_engine_tok_s: float  # the same engine with --cpu-kernels torch (no fused C++ ops)
    transformers_tok_s: float
    floor_tok_s: float             # the model's linear layers only, through F.linear
    engine_floor_tok_s: float      # the engine's own linear layers only (its GEMM kernels)
    paired_floor_ratio: float = 0.0   # median over back-to-back (engine, engine floor) pairs


def make_engine(model_dir: Path, max_num_seqs: int = 64, store=None, **overrides):
    from loraplex.server.engine.builder import build_engine
    from loraplex.server.engine.config import EngineConfig

    if "quantize" in overrides:                 # the --quantize flag's name for the method
        overrides["method"] = overrides.pop("quantize")
    settings = dict(method="none", dtype="float32", device="cpu", max_num_seqs=max_num_seqs,
                    max_batch_tokens=4096, kv_cache_memory="3GiB", max_model_len=1024, max_input_tokens=512)
    settings.update(overrides)
    engine, _info = build_engine(EngineConfig.from_settings(model_dir, **settings), store, log=lambda _m: None)
    return engine


def engine_decode_tok_s(engine, prompts: list[list[int]], new_tokens: int,
                        adapters: list[str | None] | None = None, warmup: bool = True) -> float:
    """Generated tokens per second over pure-decode steps only. warmup: first run the same
    batch for 4 tokens, untimed (a serving engine steps continuously; a benchmark engine may
    come right after another configuration's run, with that run's caches and memory state)."""
    from loraplex.server.engine.io import GenerationRequest
    from loraplex.server.engine.sequence import SamplingParams

    if warmup and new_tokens > 4:
        engine_decode_tok_s(engine, prompts, 4, adapters, warmup=False)
    sampling = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    for i, ids in enumerate(prompts):
        adapter = adapters[i] if adapters else None
        engine.add_request(GenerationRequest(request_id=f"bench-{time.monotonic_ns()}-{i}",
                                             prompt_token_ids=tuple(ids), adapter_id=adapter,
                                             sampling=sampling))
    decode_tokens, decode_s = 0, 0.0
    while engine.has_work():
        started = time.perf_counter()
        _outputs, stats = engine_step(engine)
        elapsed = time.perf_counter() - started
        if stats.batch_tokens == stats.batch_size and stats.batch_size == len(prompts):
            decode_tokens += stats.batch_size
            decode_s += elapsed
    return decode_tokens / decode_s if decode_s else 0.0


def transformers_decode_tok_s(model, prompts: list[list[int]], new_tokens: int, **kwargs) -> float:
    ids = torch.tensor(prompts)
    mask = torch.ones_like(ids)

    def run(n: int):
        with torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=0, **kwargs)

    run(2)   # warm-up, like every configuration here: the previous run left other work's caches
    full = time_it(lambda: run(new_tokens), repeats=1, warmup=0).median_s
    first = time_it(lambda: run(1), repeats=1, warmup=0).median_s
    return len(prompts) * (new_tokens - 1) / max(full - first, 1e-9)


def floor_tok_s(step, batch: int, steps: int) -> float:
    """Tokens/s of `steps` consecutive floor steps (after 2 warm-up steps): the same statistic
    as engine_decode_tok_s, which averages over its decode steps."""
    time_it(step, repeats=1, warmup=1)
    total = time_it(lambda: [step() for _ in range(steps)], repeats=1, warmup=0).median_s
    return batch * steps / total


def dense_floor_tok_s(hf_model, batch: int, steps: int = 32) -> float:
    """Only the model's linear layers (and the LM head) at this batch size: an upper bound."""
    weights = [m.weight.detach() for name, m in hf_model.named_modules()
               if isinstance(m, torch.nn.Linear)]
    inputs = {w.shape[1]: torch.randn(batch, w.shape[1], dtype=w.dtype) for w in weights}

    def step():
        with torch.inference_mode():
            for w in weights:
                F.linear(inputs[w.shape[1]], w)

    return floor_tok_s(step, batch, steps)


def served_gemm(layer, rows: int):
    """x -> layer(x) through the kernel(s) the layer serves `rows` rows with, called directly (no
    routing chain; model/decode_stack.py runs the same parts), or layer.linear when the stack
    does not run this layer's kernel."""
    from loraplex.server.layers.cpu_gemm import row_bucket
    from loraplex.server.model.decode_stack import GEMM_ONEDNN, part_linear, stack_parts

    parts = stack_parts(layer, rows)
    if parts is None:
        return layer.linear
    native = next((p.native_kernel[0] for p in getattr(layer, "parts", [layer]) if p.native_kernel), None)
    onednn = torch.ops.mkldnn._linear_pointwise.default

    def part_fn(tensors, kind, group):
        if kind == GEMM_ONEDNN and row_bucket(rows) == rows:     # the op itself, no bucket check
            return lambda x: onednn(x, tensors[0], tensors[1], "none", [], "")
        if native is None:
            return part_linear(tensors, kind, group)
        return part_linear(tensors, kind, group, native.quant_linear_4bit, native.quant_linear_8bit)

    fns = [part_fn(*part) for part in parts]
    return fns[0] if len(fns) == 1 else (lambda x: torch.cat([fn(x) for fn in fns], dim=-1))


def engine_floor_tok_s(engine, batch: int, steps: int = 32) -> float:
    """Only the engine's linear layers (incl. the LM head) at this batch size, each through the
    kernel it serves this row count with."""
    model = engine.runner.model
    layers = [proj.base for proj in model.lora_targets()] + [model.lm_head]
    gemms = [(served_gemm(layer, batch), layer.in_features) for layer in layers]
    inputs = {layer.in_features: torch.randn(batch, layer.in_features, dtype=model.dtype)
              for layer in layers}

    def step():
        with torch.inference_mode():
            for gemm, in_features in gemms:
                gemm(inputs[in_features])

    return floor_tok_s(step, batch, steps)


def run_decode_bench(model_dir: Path, batches=(1, 16, 64), prompt_len: int = 32,
                     new_tokens: int = 32, log=print) -> list[DecodeResult]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    hf_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    engine = make_engine(model_dir)
    aten_engine = make_engine(model_dir, linear_kernel="aten", kv_cache_memory="1GiB")
    torch_ops_engine = make_engine(model_dir, cpu_kernels="torch", kv_cache_memory="1GiB")
    results = []
    for batch in batches:
        prompts = prompt_ids(tokenizer, batch, prompt_len)
        pair_ratios = []

        def engine_and_floor() -> tuple[float, float]:   # back to back: the same minute
            engine_tok_s = engine_decode_tok_s(engine, prompts, new_tokens)
            floor = engine_floor_tok_s(engine, batch, new_tokens)
            pair_ratios.append(engine_tok_s / floor)
            return engine_tok_s, floor

        best = [0.0] * 6
        for _ in range(3):   # interleaved, best of each: noise only ever slows a run down
            engine_1, floor_1 = engine_and_floor()
            others = (engine_decode_tok_s(aten_engine, prompts, new_tokens),
                      engine_decode_tok_s(torch_ops_engine, prompts, new_tokens),
                      transformers_decode_tok_s(hf_model, prompts, new_tokens),
                      dense_floor_tok_s(hf_model, batch, new_tokens))
            engine_2, floor_2 = engine_and_floor()
            runs = (max(engine_1, engine_2), *others, max(floor_1, floor_2))
            best = [max(b, r) for b, r in zip(best, runs)]
        result = DecodeResult(batch, *best, paired_floor_ratio=statistics.median(pair_ratios))
        log(f"  batch {batch:3d}: engine {result.engine_tok_s:7.1f} tok/s (aten GEMMs "
            f"{result.aten_engine_tok_s:7.1f}, torch ops {result.torch_ops_engine_tok_s:7.1f}), transformers {result.transformers_tok_s:7.1f}, "
            f"F.linear floor {result.floor_tok_s:7.1f}, engine-GEMM floor {result.engine_floor_tok_s:7.1f} "
            f"(paired ratios {', '.join(f'{r:.3f}' for r in pair_ratios)})")
        results.append(result)
    return results

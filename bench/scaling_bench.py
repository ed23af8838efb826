"""Adapter scaling in the style of S-LoRA: 1, 10, 100, 1000 registered adapters, ranks 8 and 16.

Each adapter is a distinct random PEFT LoRA (q_proj + v_proj of every layer, float16) written
directly with safetensors and registered into a real AdapterStore; the engine runs in-process
with `max_loras` 32, so when more than 32 adapters are in use they are swapped through the
device slots from the store's host cache. Every configuration runs the same batch of requests
(same prompts, lengths) whose adapters are drawn uniformly or Zipf(1.0) from the registered set.
Throughput = generated tokens / wall time of the whole batch (prefill, adapter loads and decode);
TTFT is the engine's own time from arrival to first token.
"""

from __future__ import annotations

import os
import random
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from common import engine_step, prompt_ids
from engine_bench import make_engine
from lora_bench import model_shapes, open_store, write_random_adapter

TARGETS = ("q_proj", "v_proj")
ZIPF_S = 1.0


@dataclass(frozen=True)
class ScalingPoint:
    rank: int
    registered: int
    popularity: str
    distinct_used: int
    tok_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float


def register_random_adapters(store, model_dir: Path, source_root: Path, count: int, rank: int,
                             start: int = 0) -> list[str]:
    """Write, register (the store copies it) and delete `count` random adapters; returns their names."""
    num_layers, shapes = model_shapes(model_dir)
    generator = torch.Generator().manual_seed(rank * 100_003 + start)
    names = []
    for i in range(start, start + count):
        source = write_random_adapter(source_root / f"r{rank}-{i:04d}", num_layers, shapes, rank, TARGETS,
                                      generator, dtype=torch.float16)
        names.append(store.register_path(source.name, source).name)
        shutil.rmtree(source)
    return names


def run_batch(engine, prompts: list[list[int]], adapters: list[str | None],
              new_tokens: int) -> tuple[float, list[float]]:
    """All requests at once; (generated tok/s over the wall time, TTFT seconds per request)."""
    from loraplex.server.engine.io import GenerationRequest
    from loraplex.server.engine.sequence import SamplingParams

    sampling = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    started = time.perf_counter()
    for i, (ids, adapter) in enumerate(zip(prompts, adapters)):
        engine.add_request(GenerationRequest(request_id=f"scale-{time.monotonic_ns()}-{i}",
                                             prompt_token_ids=tuple(ids), adapter_id=adapter, sampling=sampling))
    generated, ttfts = 0, []
    while engine.has_work():
        outputs, _stats = engine_step(engine)
        for output in outputs:
            if output.error is not None:
                raise RuntimeError(f"scaling bench request failed: {output.error}")
            if output.finish_reason is not None:
                generated += output.generated_tokens
                ttfts.append(output.timing.first_token_s if output.timing else float("nan"))
    return generated / (time.perf_counter() - started), ttfts


def run_scaling_bench(model_dir: Path, counts=(1, 10, 100, 1000), ranks=(8, 16), num_requests: int = 64,
                      prompt_len: int = 32, new_tokens: int = 16, log=print) -> list[ScalingPoint]:
    from transformers import AutoTokenizer

    from loraplex.client.bench.stats import percentile
    from loraplex.client.bench.workload import adapter_sequence

    prompts = prompt_ids(AutoTokenizer.from_pretrained(model_dir), num_requests, prompt_len)
    points = []
    for rank in ranks:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            store = open_store(tmp / "store", model_dir, max_lora_rank=max(ranks))
            engine = make_engine(model_dir, store=store, max_loras=32, max_lora_rank=max(ranks))
            names: list[str] = []
            for count in counts:
                started = time.perf_counter()
                names += register_random_adapters(store, model_dir, tmp / "src", count - len(names), rank,
                                                  start=len(names))
                log(f"  rank {rank}: {count} adapters registered ({time.perf_counter() - started:.1f}s)")
                run_batch(engine, prompts[:4], names[:4] + [None] * (4 - len(names[:4])), 2)   # warm
                for popularity in ("uniform", "zipf"):
                    picks = adapter_sequence(tuple(names), popularity, ZIPF_S, num_requests, random.Random(count))
                    tok_s, ttfts = run_batch(engine, prompts, picks, new_tokens)
                    point = ScalingPoint(rank, count, popularity, len(set(picks)), tok_s,
                                         statistics.median(ttfts) * 1000, percentile(ttfts, 99) * 1000)
                    log(f"    {popularity:7s}: {point.distinct_used:3d} distinct, {tok_s:7.1f} tok/s, "
                        f"TTFT p50 {point.ttft_p50_ms:.0f} ms p99 {point.ttft_p99_ms:.0f} ms")
                    points.append(point)
            store.close()
    return points


def _ratio(points: list[ScalingPoint], rank: int) -> float | None:
    by = {(p.registered, p.popularity): p.tok_s for p in points if p.rank == rank}
    if (1000, "zipf") in by and (10, "zipf") in by:
        return by[(1000, "zipf")] / by[(10, "zipf")]
    return None


def plot_scaling(points: list[ScalingPoint], path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for rank in sorted({p.rank for p in points}):
        for popularity, style in (("uniform", "o-"), ("zipf", "s--")):
            line = [p for p in points if p.rank == rank and p.popularity == popularity]
            xs = [p.registered for p in line]
            left.plot(xs, [p.tok_s for p in line], style, label=f"rank {rank}, {popularity}")
            right.plot(xs, [p.ttft_p50_ms for p in line], style, label=f"rank {rank}, {popularity}")
    for axis, label in ((left, "generated tokens/s"), (right, "TTFT p50 (ms)")):
        axis.set_xscale("log")
        axis.set_xlabel("registered adapters")
        axis.set_ylabel(label)
        axis.legend()
    fig.suptitle("adapter scaling (max_loras 32)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def section_scaling(model_dir: Path, quick: bool, plot_dir: Path | None = None) -> str:
    """Markdown section 3 (S-LoRA style scaling); writes bench/plots/scaling.png next to it."""
    counts, ranks = ((1, 10, 1000), (8,)) if quick else ((1, 10, 100, 1000), (8, 16))
    num_requests, new_tokens = (8, 8) if quick else (16, 8)
    points = run_scaling_bench(model_dir, counts, ranks, num_requests=num_requests, new_tokens=new_tokens)
    root = Path(__file__).resolve().parents[1]
    plot = plot_scaling(points, (plot_dir or root / "bench" / "plots") / "scaling.png")
    lines = ["## 3. Adapter scaling (S-LoRA style)", "",
             f"Default model, float32, in-process engine, `max_loras` 32. {num_requests} requests at once "
             f"(prompts of 32 tokens, {new_tokens} generated, greedy), adapters drawn uniformly or Zipf(s={ZIPF_S:g}) "
             "from the registered set; each adapter is a distinct random rank-r LoRA on q_proj and v_proj "
             "(float16 files in a real AdapterStore). Throughput counts the whole batch: prefill, adapter "
             "loads from the store and decode.", "",
             "| rank | registered | popularity | distinct in batch | tok/s | TTFT p50 ms | TTFT p99 ms |",
             "|---:|---:|---|---:|---:|---:|---:|"]
    lines += [f"| {p.rank} | {p.registered} | {p.popularity} | {p.distinct_used} | {p.tok_s:.1f} | "
              f"{p.ttft_p50_ms:.0f} | {p.ttft_p99_ms:.0f} |" for p in points]
    lines.append("")
    for rank in ranks:
        ratio = _ratio(points, rank)
        if ratio is not None:
            verdict = "met" if ratio >= 0.8 else "MISSED"
            lines.append(f"- rank {rank}: 1000 adapters (Zipf) / 10 adapters (Zipf) throughput = "
                         f"{ratio:.2f}x (target >= 0.8x: {verdict})")
    lines += ["", f"![adapter scaling]({os.path.relpath(plot, root)})", ""]
    return "\n".join(lines)

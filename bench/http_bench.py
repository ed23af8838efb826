"""OpenAI-compatible HTTP end-to-end vs the in-process engine, at the same load.

The same design as grpc_bench.py (same workload, same EngineConfig, the two sides alternate):
the real server (`start_grpc` + `start_http_api` + `load_engine` + `attach_engine`, as
`loraplex serve` wires them) runs on an event-loop thread of this process, and `loraplex
bench --api openai`'s runner drives streamed `/v1/completions` over loopback HTTP (SSE, one
event per token). Throughput = generated tokens / wall time, first request sent to last finished.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from grpc_bench import Comparison, SideResult, comparison_section, run_side_by_side


def run_over_http(base_url: str, bench_config) -> SideResult:
    """One `loraplex bench --api openai` closed-loop run against `base_url` (.../v1)."""
    from loraplex.client.bench.openai_client import OpenAIBenchClient
    from loraplex.client.bench.runner import run_benchmark
    from loraplex.client.bench.stats import compute_stats

    async def drive():
        async with OpenAIBenchClient(base_url, timeout=600) as client:
            await client.health()
            return await run_benchmark(client, bench_config)

    result = asyncio.run(drive())
    stats = compute_stats(result.records, result.duration_s)
    if stats.failed:
        raise RuntimeError(f"HTTP bench: {stats.failed} requests failed: {stats.errors}")
    return SideResult(stats.output_throughput, stats.request_throughput, stats.ttft.p50_ms)


def run_http_bench(model_dir: Path, concurrency: int = 16, num_requests: int = 48, input_len: int = 64,
                   output_len: int = 32, rounds: int = 3, log=print) -> Comparison:
    """In-process engine vs the same engine served over HTTP (grpc_bench.run_side_by_side)."""
    return run_side_by_side(
        model_dir, lambda running, cfg: run_over_http(f"http://127.0.0.1:{running.http_port}/v1", cfg), "HTTP",
        concurrency, num_requests, input_len, output_len, rounds, log, http=True)


def section_http(model_dir: Path, quick: bool) -> str:
    """Markdown section: OpenAI-compatible HTTP end-to-end vs in-process engine throughput."""
    sizes = dict(concurrency=8, num_requests=16, input_len=32, output_len=16, rounds=1) if quick else \
        dict(concurrency=16, num_requests=48, input_len=64, output_len=32)
    r = run_http_bench(model_dir, **sizes)
    return comparison_section(
        "## 4b. OpenAI-compatible HTTP end-to-end vs in-process engine",
        f"Default model, float32, base model (no adapter). {r.num_requests} requests, closed loop at "
        f"concurrency {r.concurrency}, prompts of ~{r.input_len} tokens, {r.output_len} generated tokens each "
        "(greedy, `ignore_eos`); the same prompt texts and EngineConfig on both sides, alternating as in "
        "section 4. HTTP: the real server (gRPC and HTTP in one process, one engine) on loopback, driven by "
        "`loraplex bench --api openai` (streamed `/v1/completions`, one SSE event per token, usage in the "
        "last event); TTFT there is measured by the client.",
        ("in-process engine", "HTTP end-to-end"), r, "HTTP / in-process", 0.9)

"""gRPC end-to-end vs the in-process engine, at the same load.

Both sides get the same workload from `loraplex.client.bench.workload` (same prompt texts, same
output lengths, greedy, ignore_eos) and the same closed-loop concurrency, on engines built from
the same EngineConfig. In-process: requests go straight into `Engine.add_request`, a new one as
soon as one finishes. gRPC: the real server (`start_grpc` + `load_engine` + `attach_engine`, as
`loraplex serve` wires them) runs on an event-loop thread of this process on a loopback port,
and the `loraplex bench` runner drives it through `AsyncClient.generate_stream`. Throughput =
generated tokens / wall time from the first request sent to the last one finished.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from common import engine_step


@dataclass(frozen=True)
class SideResult:
    tok_s: float
    req_s: float
    ttft_p50_ms: float


@dataclass(frozen=True)
class Comparison:
    """Alternating closed-loop runs of a reference path and a served path (sections 4, 4b, 9)."""

    concurrency: int
    num_requests: int
    input_len: int
    output_len: int
    reference_runs: tuple[SideResult, ...]
    served_runs: tuple[SideResult, ...]

    @property
    def reference(self) -> SideResult:
        return _mean(self.reference_runs)

    @property
    def served(self) -> SideResult:
        return _mean(self.served_runs)

    @property
    def round_ratios(self) -> list[float]:
        """served / reference tok/s of each round (the two runs of a round are back to back)."""
        return [s.tok_s / r.tok_s for r, s in zip(self.reference_runs, self.served_runs)]

    @property
    def ratio(self) -> float:
        """The verdict's ratio: the median of the rounds' ratios, which cancels the drift of a
        shared machine's speed between minutes better than the ratio of the two means."""
        return statistics.median(self.round_ratios)

    @property
    def mean_ratio(self) -> float:
        return self.served.tok_s / self.reference.tok_s


def _server_config(model_dir: Path, store: Path, concurrency: int):
    from loraplex.server.config import load_server_config

    values = {"model": str(model_dir), "port": "0", "metrics_port": "0", "store": str(store),
              "quantize": "none", "dtype": "float32", "device": "cpu", "kv_cache_memory": "1GiB",
              "max_total_tokens": "1024", "max_input_tokens": "512", "max_new_tokens": "512",
              "max_num_seqs": str(max(concurrency, 1)), "max_batch_tokens": "2048"}
    return load_server_config(values, {})


def _workload(num_requests: int, concurrency: int, input_len: int, output_len: int):
    from loraplex.client.bench.config import BenchConfig, LengthSpec
    from loraplex.client.bench.workload import build_requests

    config = BenchConfig(num_prompts=num_requests, concurrency=concurrency, warmup=2, progress=False,
                         input_len=LengthSpec("fixed", input_len, input_len),
                         output_len=LengthSpec("fixed", output_len, output_len))
    return config, build_requests(config)


def run_in_process(engine, requests, concurrency: int) -> SideResult:
    """Closed loop straight into the engine: keep `concurrency` requests in it."""
    from loraplex.server.engine.io import GenerationRequest
    from loraplex.server.engine.sequence import SamplingParams

    pending = list(reversed(requests))
    in_flight, generated, ttfts, done = 0, 0, [], 0
    started = time.perf_counter()
    while pending or in_flight:
        while pending and in_flight < concurrency:
            request = pending.pop()
            engine.add_request(GenerationRequest(
                request_id=f"inproc-{request.index}-{time.monotonic_ns()}", prompt=request.prompt,
                sampling=SamplingParams(max_new_tokens=request.max_new_tokens, ignore_eos=True)))
            in_flight += 1
        outputs, _stats = engine_step(engine)
        for output in outputs:
            if output.error is not None:
                raise RuntimeError(f"in-process request failed: {output.error}")
            if output.finish_reason is not None:
                in_flight -= 1
                done += 1
                generated += output.generated_tokens
                ttfts.append(output.timing.first_token_s)
    wall = time.perf_counter() - started
    return SideResult(generated / wall, done / wall, statistics.median(ttfts) * 1000)


class _LoopThread:
    """An asyncio loop on a daemon thread, for the in-process server."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 600):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


async def _start_server(config, http: bool = False):
    """The real serve wiring on loopback: gRPC, plus the OpenAI HTTP API when `http`."""
    from loraplex.server.app import attach_engine, load_engine, start_grpc, start_http_api

    running = await start_grpc(config)
    if http:
        await start_http_api(running, config, port=0)
    store, engine = await load_engine(config, log=lambda _m: None)
    await attach_engine(running, store, engine)
    return running


def run_over_grpc(address: str, bench_config) -> SideResult:
    """One `loraplex bench` closed-loop run against the server at `address`."""
    from loraplex.client import AsyncClient
    from loraplex.client.bench.runner import run_benchmark
    from loraplex.client.bench.stats import compute_stats

    async def drive():
        async with AsyncClient(address, timeout=600) as client:
            return await run_benchmark(client, bench_config)

    result = asyncio.run(drive())
    stats = compute_stats(result.records, result.duration_s)
    if stats.failed:
        raise RuntimeError(f"gRPC bench: {stats.failed} requests failed: {stats.errors}")
    return SideResult(stats.output_throughput, stats.request_throughput, stats.ttft.p50_ms)


def _mean(results: list[SideResult]) -> SideResult:
    return SideResult(*(statistics.fmean(getattr(r, name) for r in results)
                        for name in ("tok_s", "req_s", "ttft_p50_ms")))


def run_side_by_side(model_dir: Path, remote, label: str, concurrency: int, num_requests: int,
                     input_len: int, output_len: int, rounds: int, log=print,
                     http: bool = False) -> Comparison:
    """Alternate in-process and served runs `rounds` times (so machine noise hits both).
    remote(running_server, bench_config) -> SideResult drives the served API."""
    from loraplex.server.app import drain_and_stop
    from loraplex.server.engine.builder import build_engine

    bench_config, requests = _workload(num_requests, concurrency, input_len, output_len)
    local_runs, remote_runs = [], []
    with tempfile.TemporaryDirectory() as tmp:
        config = _server_config(model_dir, Path(tmp) / "store", concurrency)
        engine, _info = build_engine(config.engine_config(model_dir), None, log=lambda _m: None)
        _config, warm = _workload(2, 2, input_len, 4)
        run_in_process(engine, warm, 2)
        loop = _LoopThread()
        try:
            running = loop.run(_start_server(config, http))
            for round_index in range(rounds):
                local_runs.append(run_in_process(engine, requests, concurrency))
                remote_runs.append(remote(running, bench_config))
                log(f"  round {round_index + 1}: in-process {local_runs[-1].tok_s:.1f} tok/s, "
                    f"{label} {remote_runs[-1].tok_s:.1f} tok/s")
            loop.run(drain_and_stop(running, 1.0, log=lambda _m: None))
        finally:
            loop.close()
    return Comparison(concurrency, num_requests, input_len, output_len, tuple(local_runs), tuple(remote_runs))


def run_grpc_bench(model_dir: Path, concurrency: int = 16, num_requests: int = 48, input_len: int = 64,
                   output_len: int = 32, rounds: int = 3, log=print) -> Comparison:
    """In-process engine vs the same engine served over gRPC (run_side_by_side)."""
    return run_side_by_side(
        model_dir, lambda running, cfg: run_over_grpc(f"127.0.0.1:{running.port}", cfg), "gRPC",
        concurrency, num_requests, input_len, output_len, rounds, log)


def section_grpc(model_dir: Path, quick: bool) -> str:
    """Markdown section 4: gRPC end-to-end vs in-process engine throughput."""
    sizes = dict(concurrency=8, num_requests=16, input_len=32, output_len=16, rounds=1) if quick else \
        dict(concurrency=16, num_requests=48, input_len=64, output_len=32)
    r = run_grpc_bench(model_dir, **sizes)
    return comparison_section(
        "## 4a. gRPC end-to-end vs in-process engine (closed loop, prefill included)",
        f"Default model, float32, base model (no adapter). {r.num_requests} requests, closed loop at "
        f"concurrency {r.concurrency}, prompts of ~{r.input_len} tokens, {r.output_len} generated tokens each "
        "(greedy, `ignore_eos`); the same prompt texts and the same EngineConfig on both sides; the two "
        "sides alternate (in-process, gRPC, in-process, gRPC, ...), each row is the mean of its runs and the "
        "verdict uses the median of the rounds' ratios. gRPC: the real "
        "server on a loopback port in this process, driven by `loraplex bench`'s runner "
        "(`AsyncClient.generate_stream`, one chunk per token); TTFT there is measured by the client.",
        ("in-process engine", "gRPC end-to-end"), r, "gRPC / in-process", 0.9)


def comparison_section(title: str, intro: str, labels: tuple[str, str], comparison: Comparison,
                       ratio_name: str, target: float) -> str:
    """A markdown section comparing closed-loop runs (tok/s, req/s, TTFT p50) with a verdict line;
    shared by the gRPC, HTTP and fleet sections."""
    ratio = comparison.ratio
    verdict = "met" if ratio >= target else "MISSED"
    rows = zip(labels, (comparison.reference, comparison.served))
    rounds = ", ".join(f"{value:.3f}x" for value in comparison.round_ratios)
    return "\n".join([
        title,
        "",
        intro,
        "",
        "| path | output tok/s | req/s | TTFT p50 ms |",
        "|---|---:|---:|---:|",
        *(f"| {label} | {run.tok_s:.1f} | {run.req_s:.2f} | {run.ttft_p50_ms:.0f} |" for label, run in rows),
        "",
        f"{ratio_name} = {ratio:.3f}x, median of the rounds ({rounds}); mean / mean {comparison.mean_ratio:.3f}x "
        f"(target >= {target}x: {verdict}).",
        "",
    ])

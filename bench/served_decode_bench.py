"""Served decode vs the main-thread engine (issue 36; `make bench` section 4).

The reference is section 1's statistic: the engine built and stepped on this process's MAIN
thread, decode tokens/s over the steps where every prompt of the batch is in the cache. The
served paths run the real server (`start_grpc` + `start_http_api` + `load_engine` +
`attach_engine`, as `loraplex serve` wires them) on an event-loop thread of this process:
with `--engine-process on` (the engine core in its own process, stepped on that process's main
thread) and `off` (the engine on a thread of the server's process). `batch` streamed requests
(the same prompt texts, greedy, `ignore_eos`) are sent at once through `loraplex bench`'s
runners (gRPC: `AsyncClient.generate_stream`; HTTP: streamed `/v1/completions`); their decode
rate is counted by the client over the window in which all of them stream: from the last
request's first token to the first request's last token. The paths alternate in rounds so a
shared machine's drift hits each; ratios are medians of each round's served / reference.

The IPC cost per step is measured apart: one engine step's message (wire.Step, `batch` outputs
of one token each, plus stats) encoded, sent over a ZeroMQ ipc:// pipe, received and decoded.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

from engine_bench import engine_decode_tok_s
from grpc_bench import _LoopThread, _server_config, _start_server, _workload

PATHS = ("gRPC, engine process", "HTTP, engine process", "gRPC, engine thread")


@dataclass(frozen=True)
class DecodeRow:
    batch: int
    reference_tok_s: float                 # best round, main-thread engine
    served_tok_s: tuple[float, ...]        # best round of each PATHS entry
    ratios: tuple[float, ...]              # median over rounds of served / reference, per path
    ipc_us_per_step: float


def window_decode_tok_s(records) -> float:
    """Tokens/s over the window where every request streams (all past their first token)."""
    start = max(r.chunk_s[0] for r in records)
    end = min(r.chunk_s[-1] for r in records)
    tokens = sum(n for r in records for t, n in zip(r.chunk_s, r.chunk_tokens) if start < t <= end)
    return tokens / (end - start) if end > start else 0.0


def _served(client_factory, bench_config) -> float:
    from loraplex.client.bench.runner import run_benchmark

    async def drive():
        async with client_factory() as client:
            return await run_benchmark(client, bench_config)

    result = asyncio.run(drive())
    failed = [r for r in result.records if not r.ok]
    if failed:
        raise RuntimeError(f"served decode bench: {len(failed)} requests failed ({failed[0].error})")
    return window_decode_tok_s(result.records)


def grpc_driver(port: int):
    from loraplex.client import AsyncClient

    return lambda: AsyncClient(f"127.0.0.1:{port}", timeout=600)


def http_driver(port: int):
    from loraplex.client.bench.openai_client import OpenAIBenchClient

    return lambda: OpenAIBenchClient(f"http://127.0.0.1:{port}/v1", timeout=600)


def ipc_us_per_step(batch: int, repeats: int = 500) -> float:
    """Microseconds to encode, send, receive and decode one step's message of `batch` outputs."""
    import zmq

    from loraplex.server.engine.engine import StepStats
    from loraplex.server.engine.io import EngineStats, RequestOutput
    from loraplex.server.engine.proc import wire

    outputs = [RequestOutput(f"req-{i}", " tok", (1234,)) for i in range(batch)]
    stats = EngineStats(batch, 0, 100, 200, 0, 0, batch, batch, 0)
    step = StepStats(batch, batch, 0.01, batch, 0, 0.5, 0, 0, 0)
    context = zmq.Context()
    with tempfile.TemporaryDirectory() as tmp:
        pull, push = context.socket(zmq.PULL), context.socket(zmq.PUSH)
        pull.bind(f"ipc://{tmp}/bench")
        push.connect(f"ipc://{tmp}/bench")
        sender, receiver = wire.core_codec(), wire.front_codec()
        samples = []
        for _ in range(5):
            started = time.perf_counter()
            for _ in range(repeats):
                push.send(sender.encode(wire.Step(outputs, stats, step)))
                receiver.decode(pull.recv())
            samples.append((time.perf_counter() - started) / repeats * 1e6)
        push.close(0)
        pull.close(0)
    context.term()
    return statistics.median(samples)


def run_served_decode_bench(model_dir: Path, batches=(1, 16, 64), input_len: int = 32, output_len: int = 64,
                            rounds: int = 3, log=print) -> list[DecodeRow]:
    from loraplex.server.app import drain_and_stop
    from loraplex.server.engine.builder import build_engine
    from loraplex.server.engine.prompt import encode_prompt

    max_batch = max(batches)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        config = replace(_server_config(model_dir, Path(tmp) / "store", max_batch), kv_cache_memory="512MiB")
        engine, _info = build_engine(config.engine_config(model_dir), None, log=lambda _m: None)
        loop = _LoopThread()
        servers = []
        try:
            for engine_process, store in ((True, "store-proc"), (False, "store-thread")):
                server_config = replace(config, engine_process=engine_process, store=str(Path(tmp) / store))
                servers.append(loop.run(_start_server(server_config, http=engine_process)))
            on_process, on_thread = servers
            drivers = (grpc_driver(on_process.port), http_driver(on_process.http_port), grpc_driver(on_thread.port))
            for batch in batches:
                bench_config, requests = _workload(batch, batch, input_len, output_len)
                bench_config = replace(bench_config, warmup=0)
                prompts = [encode_prompt(engine.tokenizer, r.prompt) for r in requests]
                reference, served = [], [[] for _ in drivers]
                for round_index in range(rounds):
                    reference.append(engine_decode_tok_s(engine, prompts, output_len))
                    for runs, driver in zip(served, drivers):
                        runs.append(_served(driver, bench_config))
                    log(f"  batch {batch:3d} round {round_index + 1}: main-thread engine {reference[-1]:.1f} tok/s, "
                        + ", ".join(f"{name} {runs[-1]:.1f}" for name, runs in zip(PATHS, served)))
                ratios = tuple(statistics.median(s / r for s, r in zip(runs, reference)) for runs in served)
                rows.append(DecodeRow(batch, max(reference), tuple(max(runs) for runs in served), ratios,
                                      ipc_us_per_step(batch)))
            for running in servers:
                loop.run(drain_and_stop(running, 1.0, log=lambda _m: None))
        finally:
            loop.close()
    return rows


def section_served_decode(model_dir: Path, quick: bool) -> str:
    batches = (1, 16) if quick else (1, 16, 64)
    rows = run_served_decode_bench(model_dir, batches, output_len=32 if quick else 64, rounds=2 if quick else 3)
    lines = [
        "## 4. Served decode vs the main-thread engine",
        "",
        "Default model, float32, base model, prompts of ~32 tokens, greedy, `ignore_eos`. Reference: the",
        "engine of section 1, stepped on this process's main thread (decode steps only). Served: `batch`",
        "streamed requests at once through the real server on loopback, decode rate counted by the client",
        "while all of them stream. *engine process*: `--engine-process on` (the default: the engine core in",
        "its own process, on its main thread, started with `GOMP_SPINCOUNT=1000`); *engine thread*:",
        "`--engine-process off`. Each figure is",
        "the best of its rounds; each ratio the median of the rounds' served / reference (the paths",
        "alternate within a round). *IPC per step*: one step's message (`batch` one-token outputs and",
        "the stats) encoded, sent over the ZeroMQ ipc pipe, received and decoded, in one thread.",
        "",
        "| batch | main-thread engine tok/s | " + " | ".join(f"{p} tok/s" for p in PATHS) + " | "
        + " | ".join(f"{p} / engine" for p in PATHS) + " | IPC per step (us) |",
        "|---:|" + "---:|" * (2 * len(PATHS) + 2),
    ]
    for r in rows:
        lines.append(f"| {r.batch} | {r.reference_tok_s:.1f} | " + " | ".join(f"{v:.1f}" for v in r.served_tok_s)
                     + " | " + " | ".join(f"{v:.2f}x" for v in r.ratios) + f" | {r.ipc_us_per_step:.0f} |")
    worst = min(min(r.ratios[:2]) for r in rows)
    lines += ["", f"Target (issue 36): served decode through gRPC and HTTP >= 0.95x the main-thread engine at "
              f"every batch: worst {worst:.2f}x ({'met' if worst >= 0.95 else 'MISSED'}).", ""]
    return "\n".join(lines)

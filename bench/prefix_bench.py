"""Prefix caching on vs `--no-prefix-caching`, side by side (BENCHMARKS.md section 13).

Two real servers (gRPC on loopback, `start_grpc` + `load_engine` + `attach_engine` as `loraplex
serve` wires them) share one adapter store of 16 random rank-8 adapters and differ only in the
flag. `loraplex bench`'s runner drives both with the same workloads, alternating on / off each
round so drift of the shared machine hits both:
- shared-prefix: request i uses adapter i % 16 and sends that adapter's ~440-token system prompt
  plus a fresh ~16-token question; rounds of 64 requests in flight, 16 new tokens each;
- multi-turn: 16 conversations (one per adapter) of 8 turns, each turn resending the
  conversation so far (system prompt, earlier questions and the server's answers) + a new message;
- no shared prefix: 32-token random prompts, 32 new tokens, 16 adapters (the hashing's cost).
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path

from grpc_bench import _LoopThread, _start_server


@dataclass(frozen=True)
class Side:
    tok_s: float
    ttft_p50_ms: float
    prompt_tokens: int
    cached_tokens: int


@dataclass(frozen=True)
class Workload:
    name: str
    options: dict
    rounds: int


def _server_config(model_dir: Path, store: Path, caching: bool):
    from loraplex.server.config import load_server_config

    values = {"model": str(model_dir), "port": "0", "metrics_port": "0", "store": str(store),
              "quantize": "none", "dtype": "float32", "device": "cpu", "kv_cache_memory": "768MiB",
              "max_total_tokens": "2048", "max_input_tokens": "1536", "max_new_tokens": "64",
              "max_num_seqs": "64", "max_batch_tokens": "2048", "max_loras": "16",
              "no_prefix_caching": not caching}
    return load_server_config(values, {})


def _bench_config(options: dict, adapters: tuple[str, ...], seed: int):
    from loraplex.client.bench.config import BenchConfig, LengthSpec

    opts = dict(options)
    input_len, output_len = opts.pop("input_len"), opts.pop("output_len")
    return BenchConfig(adapters=adapters, progress=False, warmup=0, seed=seed,
                       input_len=LengthSpec("fixed", input_len, input_len),
                       output_len=LengthSpec("fixed", output_len, output_len), **opts)


def _drive(address: str, config) -> Side:
    from loraplex.client import AsyncClient
    from loraplex.client.bench.runner import run_benchmark
    from loraplex.client.bench.stats import compute_stats

    async def drive():
        async with AsyncClient(address, timeout=1800) as client:
            return await run_benchmark(client, config)

    result = asyncio.run(drive())
    stats = compute_stats(result.records, result.duration_s)
    if stats.failed:
        raise RuntimeError(f"prefix bench: {stats.failed} requests failed: {stats.errors}")
    return Side(stats.output_throughput, stats.ttft.p50_ms, stats.prompt_tokens, stats.cached_prompt_tokens)


def run_prefix_bench(model_dir: Path, workloads: list[Workload], log=print) -> dict[str, list[tuple[Side, Side]]]:
    """Per workload, per round: (cache on, cache off)."""
    from loraplex.adapters_store.config import StoreConfig
    from loraplex.adapters_store.store import AdapterStore
    from loraplex.server.app import drain_and_stop
    from loraplex.server.engine.builder import base_spec_for
    from scaling_bench import register_random_adapters

    results: dict[str, list[tuple[Side, Side]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        store_dir = Path(tmp) / "store"
        on_config, off_config = (_server_config(model_dir, store_dir, c) for c in (True, False))
        store = AdapterStore(store_dir, StoreConfig(allowed_register_roots=(tmp,)),
                             base_spec_for(on_config.engine_config(model_dir)))
        adapters = tuple(register_random_adapters(store, model_dir, Path(tmp) / "src", 16, 8))
        store.close()
        loop = _LoopThread()
        try:
            on = loop.run(_start_server(on_config))
            off = loop.run(_start_server(off_config))
            addresses = {True: f"127.0.0.1:{on.port}", False: f"127.0.0.1:{off.port}"}
            warm = _bench_config(dict(input_len=8, output_len=4, num_prompts=16, concurrency=16), adapters, 99)
            for caching in (True, False):
                _drive(addresses[caching], warm)              # adapters into slots, kernels warm
            for workload in workloads:
                if workload.options.get("workload") == "shared-prefix":   # steady state: prompts cached
                    for caching in (True, False):
                        _drive(addresses[caching], _bench_config(workload.options, adapters, seed=1000))
                rounds = results[workload.name] = []
                for index in range(workload.rounds):         # a fresh seed: new questions each round
                    config = _bench_config(workload.options, adapters, seed=index)
                    pair = tuple(_drive(addresses[caching], config) for caching in (True, False))
                    rounds.append(pair)
                    log(f"  {workload.name} round {index + 1}: on {pair[0].tok_s:.1f} tok/s "
                        f"(TTFT p50 {pair[0].ttft_p50_ms:.0f} ms, {pair[0].cached_tokens}/{pair[0].prompt_tokens} "
                        f"cached), off {pair[1].tok_s:.1f} tok/s (TTFT p50 {pair[1].ttft_p50_ms:.0f} ms)")
            for running in (on, off):
                loop.run(drain_and_stop(running, 1.0, log=lambda _m: None))
        finally:
            loop.close()
    return results


WORKLOADS = [
    Workload("shared-prefix", dict(workload="shared-prefix", prefix_len=440, input_len=16, output_len=16,
                                   num_prompts=64, concurrency=64), rounds=2),
    Workload("multi-turn", dict(workload="multi-turn", prefix_len=128, turns=8, input_len=32, output_len=16,
                                num_prompts=128, concurrency=16), rounds=1),
    Workload("no shared prefix (32 tokens)", dict(input_len=32, output_len=32, num_prompts=64, concurrency=16),
             rounds=2),
]
QUICK = [Workload(w.name, {**w.options, "num_prompts": w.options["num_prompts"] // 2,
                           "concurrency": max(1, w.options["concurrency"] // 2)}, rounds=1) for w in WORKLOADS]
TARGETS = {"shared-prefix": (6.0, 8.0), "multi-turn": (3.0, None), "no shared prefix (32 tokens)": (0.97, None)}


def section_prefix(model_dir: Path, quick: bool) -> str:
    workloads = QUICK if quick else WORKLOADS
    return render_section(workloads, run_prefix_bench(model_dir, workloads))


def render_section(workloads: list[Workload], results: dict[str, list[tuple[Side, Side]]]) -> str:
    """The markdown section from the rounds' (cache on, cache off) results."""
    shared, turns, plain = (w.options for w in workloads)
    lines = [
        "## 13. Prefix caching: on vs `--no-prefix-caching`",
        "",
        "Default model, float32, two real gRPC servers on loopback sharing one store of 16 random rank-8",
        "adapters, identical except `--no-prefix-caching`, driven by `loraplex bench`'s runner, alternating",
        "on / off every round (so the shared machine's drift hits both). *shared-prefix*: request i uses",
        f"adapter i % 16 and sends its ~440-token system prompt + a fresh 16-token question, rounds of "
        f"{shared['num_prompts']} requests with {shared['concurrency']} in flight, 16 new tokens "
        "(`loraplex bench --workload shared-prefix --prefix-len 440 --input-len 16 --output-len 16 --num-adapters 16",
        f"--num-prompts {shared['num_prompts']} --concurrency {shared['concurrency']}`), after one unmeasured "
        "round of the same kind (the steady state of chat traffic: the system prompts are cached).",
        f"*multi-turn*: {turns['num_prompts'] // turns['turns']} conversations (adapter c % 16) of "
        f"{turns['turns']} turns, {turns['concurrency']} at a time, each turn resending the conversation so far",
        "(128-token system prompt, earlier 32-token messages and the server's 16-token answers) + a new",
        f"message (`--workload multi-turn --turns {turns['turns']}`). *no shared prefix*: "
        f"{plain['num_prompts']} random 32-token prompts, 32 new tokens, {plain['concurrency']} in flight",
        "(the cost of hashing when nothing is reused).",
        "Ratios are medians over the rounds' on/off pairs; *cached* is the share of prompt tokens the",
        "cache-on server reported in `usage.cached_tokens`.",
        "",
        "| workload | rounds | on tok/s | off tok/s | on/off tok/s | on TTFT p50 ms | off TTFT p50 ms | "
        "TTFT off/on | cached |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    verdicts = []
    for name, pairs in results.items():
        ratio = statistics.median(on.tok_s / off.tok_s for on, off in pairs)
        ttft = statistics.median(off.ttft_p50_ms / on.ttft_p50_ms for on, off in pairs)
        on_mean = [statistics.fmean(getattr(on, f) for on, _ in pairs) for f in ("tok_s", "ttft_p50_ms")]
        off_mean = [statistics.fmean(getattr(off, f) for _, off in pairs) for f in ("tok_s", "ttft_p50_ms")]
        cached = sum(on.cached_tokens for on, _ in pairs) / max(1, sum(on.prompt_tokens for on, _ in pairs))
        lines.append(f"| {name} | {len(pairs)} | {on_mean[0]:.1f} | {off_mean[0]:.1f} | {ratio:.2f}x | "
                     f"{on_mean[1]:.0f} | {off_mean[1]:.0f} | {ttft:.2f}x | {cached:.0%} |")
        tok_target, ttft_target = TARGETS[name]
        verdict = f"{name}: throughput {ratio:.2f}x (target >= {tok_target}x: {'met' if ratio >= tok_target else 'MISSED'})"
        if ttft_target is not None:
            verdict += f", TTFT p50 {ttft:.2f}x lower (target >= {ttft_target}x: " \
                       f"{'met' if ttft >= ttft_target else 'MISSED'})"
        verdicts.append(verdict + ".")
    return "\n".join(lines + ["", "Targets (issue 30): " + " ".join(verdicts), ""])

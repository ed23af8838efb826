"""Latency under interference (issue 36; `make bench` section 14).

Measures, for both EngineClient implementations (`--engine-process on`: the engine core in its
own process; `off`: the engine on a thread of the server's process), on the real server on
loopback (`start_grpc` + `start_http_api` + `load_engine` + `attach_engine`, as
bench/served_decode_bench.py starts it), the two alternating within each round:

(a) the inter-token latency (ITL) of one unrelated greedy gRPC stream, idle and while large
    requests arrive back to back: a 3.9 MB prompt over gRPC and over HTTP that the front end
    refuses for length after tokenizing a prefix of it (server/engine/long_prompt.py; the
    server's `max_input_tokens` is raised so that the byte bound admits the prompt to the
    tokenizer), and a 4.5 MB HTTP body refused by its size. Interfered gaps are the stream's gaps that overlap an interfering request (from its
    send to its answer); idle gaps come from the same stream with nothing else sent.
(b) health latency (grpc.health.v1 Check and HTTP GET /health, alternating every 25 ms) while
    `batch` streams decode at once, over the window in which all of them stream; and idle.
(c) the structured-output batch of section 8 (batch 16, 8 rows constrained by its JSON Schema)
    served through each implementation, client-side decode rate while all 16 stream, against
    the same batch on an in-process engine stepped on this process's main thread.

The clients run in two spawned processes of their own (bench/latency_client.py): the measuring
one (the ITL stream, the health prober) does nothing else, so neither the server's GIL nor the
load generator's work is counted as latency. bench/latency_report.py writes the section.
Usage: python bench/latency_bench.py [--quick]
"""

from __future__ import annotations

import math
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

from latency_client import INTERFERENCES, PROMPT_BYTES, Worker

PATHS = ("engine process", "engine thread")
ITL_TARGET, HEALTH_TARGET_MS = 1.2, 10.0
IDLE_HEALTH_S = 1.5


@dataclass(frozen=True)
class ItlRow:
    path: str
    scenario: str
    idle_ms: tuple[float, float]        # p50, p99 of the idle gaps (all rounds)
    loaded_ms: tuple[float, float]      # p50, p99 of the interfered gaps (all rounds)
    ratio: float                        # median over rounds of interfered p99 / idle p99
    interference_ms: float              # median time one interfering request took
    outcomes: str                       # how the interfering requests were answered


@dataclass(frozen=True)
class HealthRow:
    path: str
    kind: str
    idle_ms: tuple[float, float]
    load_ms: tuple[float, float]
    count: int                          # probes during full-load decode


@dataclass(frozen=True)
class StructuredRow:
    in_process_tok_s: float             # best round, main-thread engine
    served_tok_s: tuple[float, ...]     # best round per PATHS entry
    ratios: tuple[float, ...]           # median over rounds of served / in-process, per path
    round_ratios: tuple[tuple[float, ...], ...]


# ---- statistics ------------------------------------------------------------------------------
def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def p50_p99_ms(seconds: list[float]) -> tuple[float, float]:
    return (percentile(seconds, 50) * 1e3, percentile(seconds, 99) * 1e3) if seconds else (math.nan, math.nan)


def gaps(times: list[float], skip: int = 2) -> list[tuple[float, float]]:
    """(start, end) of each inter-token gap, after the first `skip` tokens (prefill, first step)."""
    return list(zip(times[skip:], times[skip + 1:]))


def window(records: list[dict]) -> tuple[float, float]:
    """(start, end) of the window in which every request streams: from the last request's
    first token to the first request's last token."""
    return max(r["chunk_s"][0] for r in records), min(r["chunk_s"][-1] for r in records)


def overlapping(spans: list[tuple[float, float]], windows: list[tuple[float, float]]) -> list[float]:
    """Lengths of the spans that overlap any window."""
    return [end - start for start, end in spans if any(s < end and start < e for s, e in windows)]


# ---- the servers -----------------------------------------------------------------------------
class Servers:
    """Both implementations served on loopback from this process (gRPC + HTTP each)."""

    def __init__(self, model_dir: Path, tmp: Path, max_batch: int):
        from grpc_bench import _LoopThread, _server_config

        base = replace(_server_config(model_dir, tmp / "store", max_batch), **tokenized_limits(model_dir))
        self.loop = _LoopThread()
        self.running = []
        self.model = base.base_model_name
        self.max_input_tokens = base.max_input_tokens
        self._configs = [replace(base, engine_process=on, store=str(tmp / f"store-{on}")) for on in (True, False)]

    def __enter__(self) -> "Servers":
        from grpc_bench import _start_server

        try:
            for config in self._configs:
                self.running.append(self.loop.run(_start_server(config, http=True)))
        except BaseException:
            self.__exit__()
            raise
        return self

    def ports(self) -> list[tuple[str, int, int]]:
        return [(path, r.port, r.http_port) for path, r in zip(PATHS, self.running)]

    def __exit__(self, *_exc) -> None:
        from loraplex.server.app import drain_and_stop

        try:
            for running in self.running:
                self.loop.run(drain_and_stop(running, 1.0, log=lambda _m: None))
        finally:
            self.loop.close()


def tokenized_limits(model_dir: Path) -> dict:
    """max_input_tokens just high enough that the byte bound (max_input_tokens x the longest
    token's bytes) admits a PROMPT_BYTES prompt to the tokenizer, and a KV cache that fits one
    request of max_total_tokens (float32: 2 x layers x kv heads x head dim x 4 bytes a token)."""
    import json

    from loraplex.server.engine.prompt import load_tokenizer, max_token_bytes

    tokens = math.ceil(PROMPT_BYTES / max_token_bytes(load_tokenizer(model_dir))) + 1
    hf = json.loads((model_dir / "config.json").read_text())
    head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
    per_token = 2 * hf["num_hidden_layers"] * hf["num_key_value_heads"] * head_dim * 4
    kv_mib = max(1024, math.ceil((tokens + 1024) * per_token * 1.25 / 2**20))
    return dict(max_input_tokens=max(512, tokens), max_total_tokens=max(1024, tokens + 512),
                kv_cache_memory=f"{kv_mib}MiB")


# ---- (a) inter-token latency under interference ----------------------------------------------
def measure_itl(servers: Servers, probe: Worker, load: Worker, prompt: str, tokens: int, rounds: int,
                log=print) -> list[ItlRow]:
    idle = {path: [] for path in PATHS}                           # per round: gap lengths
    loaded = {(path, kind): [] for path in PATHS for kind in INTERFERENCES}
    windows = {key: [] for key in loaded}
    for round_index in range(rounds):
        for path, port, http_port in servers.ports():
            times = probe.run("stream", port=port, prompt=prompt, tokens=tokens)
            idle[path].append([end - start for start, end in gaps(times)])
            for kind in INTERFERENCES:
                load.start("interfere", kind=kind, port=port, http_port=http_port, model=servers.model)
                times = probe.run("stream", port=port, prompt=prompt, tokens=tokens)
                sent = load.stop()
                loaded[path, kind].append(overlapping(gaps(times), [(s, e) for s, e, _ in sent]))
                windows[path, kind] += sent
            log(f"  ITL round {round_index + 1}, {path}: idle p99 {p50_p99_ms(idle[path][-1])[1]:.1f} ms, "
                + ", ".join(f"{kind} {p50_p99_ms(loaded[path, kind][-1])[1]:.1f}" for kind in INTERFERENCES))
    return [itl_row(path, kind, idle[path], loaded[path, kind], windows[path, kind])
            for path in PATHS for kind in INTERFERENCES]


def itl_row(path: str, kind: str, idle: list[list[float]], loaded: list[list[float]],
            sent: list[tuple[float, float, str]]) -> ItlRow:
    ratios = [percentile(l, 99) / percentile(i, 99) for i, l in zip(idle, loaded) if i and l]
    outcomes = sorted({outcome for _s, _e, outcome in sent})
    return ItlRow(path, kind, p50_p99_ms(sum(idle, [])), p50_p99_ms(sum(loaded, [])),
                  statistics.median(ratios) if ratios else math.nan,
                  statistics.median(e - s for s, e, _ in sent) * 1e3 if sent else math.nan,
                  f"{len(sent)} x " + " / ".join(outcomes))


# ---- (b) health during full-load decode -------------------------------------------------------
def measure_health(servers: Servers, probe: Worker, load: Worker, prompts: list[str], tokens: int,
                   rounds: int, log=print) -> list[HealthRow]:
    samples = {path: [] for path in PATHS}
    for round_index in range(rounds):
        for path, port, http_port in servers.ports():
            probe.start("health", port=port, http_port=http_port)
            time.sleep(IDLE_HEALTH_S)                             # idle probes first
            records = load.run("streams", port=port, prompts=prompts, tokens=tokens)
            probes = probe.stop()
            start, end = window(records)
            first_sent = min(r["sent"] for r in records)
            samples[path] += [(kind, latency, "idle" if sent < first_sent else "load" if start <= sent <= end
                               else None) for sent, latency, kind in probes]
            load_ms = [lat for kind, lat, phase in samples[path] if phase == "load"]
            log(f"  health round {round_index + 1}, {path}: {len(load_ms)} probes in {end - start:.1f} s of "
                f"full load, p99 {p50_p99_ms(load_ms)[1]:.2f} ms")
    rows = []
    for path in PATHS:
        for kind in ("gRPC Check", "HTTP /health"):
            of = {phase: [lat for k, lat, p in samples[path] if k == kind and p == phase] for phase in ("idle", "load")}
            rows.append(HealthRow(path, kind, p50_p99_ms(of["idle"]), p50_p99_ms(of["load"]), len(of["load"])))
    return rows


# ---- (c) the structured batch of section 8 ----------------------------------------------------
def measure_structured(servers: Servers, load: Worker, model_dir: Path, prompts: list[str], tokens: int,
                       rounds: int, log=print) -> StructuredRow:
    from engine_bench import make_engine
    from structured_bench import LONG_SCHEMA, _decode_tok_s

    from loraplex.server.engine.prompt import encode_prompt

    engine = make_engine(model_dir, max_num_seqs=len(prompts), kv_cache_memory="256MiB")
    ids = [encode_prompt(engine.tokenizer, p) for p in prompts]
    half = len(prompts) // 2
    _decode_tok_s(engine, ids, 4, half)                           # warm-up: compiles the schema once
    for _path, port, _http in servers.ports():
        load.run("streams", port=port, prompts=prompts, tokens=4, constrained=half, schema=LONG_SCHEMA)
    local, served = [], [[] for _ in PATHS]
    for round_index in range(rounds):
        local.append(_decode_tok_s(engine, ids, tokens, half))
        for runs, (_path, port, _http) in zip(served, servers.ports()):
            records = load.run("streams", port=port, prompts=prompts, tokens=tokens, constrained=half,
                               schema=LONG_SCHEMA)
            runs.append(window_tok_s(records))
        log(f"  structured round {round_index + 1}: in-process {local[-1]:.1f} tok/s, "
            + ", ".join(f"{path} {runs[-1]:.1f}" for path, runs in zip(PATHS, served)))
    round_ratios = tuple(tuple(runs[i] / local[i] for runs in served) for i in range(rounds))
    return StructuredRow(max(local), tuple(max(runs) for runs in served),
                         tuple(statistics.median(r[p] for r in round_ratios) for p in range(len(PATHS))),
                         round_ratios)


def window_tok_s(records: list[dict]) -> float:
    """Tokens/s over the window in which every request streams (served_decode_bench's count)."""
    start, end = window(records)
    tokens = sum(n for r in records for t, n in zip(r["chunk_s"], r["chunk_tokens"]) if start < t <= end)
    return tokens / (end - start) if end > start else 0.0


# ---- the run and its section ------------------------------------------------------------------
@dataclass(frozen=True)
class LatencyResult:
    itl: list[ItlRow]
    health: list[HealthRow]
    structured: StructuredRow
    max_input_tokens: int
    sizes: dict
    load_avg: tuple[float, ...]         # 1-minute load average at the start, middle and end


def run_latency_bench(model_dir: Path, quick: bool, log=print) -> LatencyResult:
    from grpc_bench import _workload

    sizes = dict(itl_tokens=32, itl_rounds=1, batch=64, health_tokens=16, health_rounds=1, structured_tokens=12,
                 structured_rounds=1) if quick else \
        dict(itl_tokens=64, itl_rounds=2, batch=64, health_tokens=32, health_rounds=2, structured_tokens=24,
             structured_rounds=2)
    prompts = [r.prompt for r in _workload(sizes["batch"], sizes["batch"], 32, 1)[1]]
    with tempfile.TemporaryDirectory() as tmp, Servers(model_dir, Path(tmp), sizes["batch"]) as servers, \
            Worker() as probe, Worker() as load:
        for _path, port, _http in servers.ports():                # the first requests of a server are slow
            load.run("streams", port=port, prompts=prompts[:4], tokens=8)
        load_avg = [os.getloadavg()[0]]
        itl = measure_itl(servers, probe, load, prompts[0], sizes["itl_tokens"], sizes["itl_rounds"], log)
        load_avg.append(os.getloadavg()[0])
        health = measure_health(servers, probe, load, prompts, sizes["health_tokens"], sizes["health_rounds"], log)
        structured = measure_structured(servers, load, model_dir, prompts[:16], sizes["structured_tokens"],
                                        sizes["structured_rounds"], log)
        return LatencyResult(itl, health, structured, servers.max_input_tokens, sizes,
                             (*load_avg, os.getloadavg()[0]))


def section_latency(model_dir: Path, quick: bool) -> str:
    from latency_report import report

    return report(run_latency_bench(model_dir, quick), quick)


if __name__ == "__main__":
    import argparse
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    parser = argparse.ArgumentParser(description="Latency under interference (issue 36)")
    parser.add_argument("--quick", action="store_true", help="smaller sizes (smoke run)")
    args = parser.parse_args()
    from loraplex.server.host_tuning import tune_malloc
    from loraplex.server.model.default_model import ensure_default_model

    print(f"[bench] {tune_malloc()} (as `loraplex serve` does)", flush=True)
    print(section_latency(ensure_default_model(), args.quick))

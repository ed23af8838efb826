"""BENCHMARKS.md section 14 from a bench/latency_bench.py run: tables and verdict lines, every
verdict computed from the run's own numbers."""

from __future__ import annotations

import math

from latency_bench import HEALTH_TARGET_MS, ITL_TARGET, PATHS, LatencyResult


def _pair(values: tuple[float, float], digits: int = 1) -> str:
    return f"{values[0]:.{digits}f} / {values[1]:.{digits}f}"


def _verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def itl_lines(result: LatencyResult) -> list[str]:
    sizes = result.sizes
    lines = [
        "### (a) Inter-token latency of an unrelated stream while large requests are refused",
        "",
        f"One greedy gRPC stream of {sizes['itl_tokens']} tokens (a ~32-token prompt), first idle, then once per",
        "interference while the other client sends that request for the whole stream, one at a time (the next",
        "when the last is answered, at most ten a second). *Interfered*",
        "gaps are the stream's gaps (after its first two tokens) that overlap a request from its send to its",
        "answer; *idle* gaps come from the idle stream of the same path and round. *p99 ratio*: interfered p99 /",
        "idle p99 of the same round, median over rounds (p50 / p99 columns pool every round).",
        "",
        "| path | interference | answered | one request ms (median) | idle ITL p50 / p99 ms | "
        "interfered ITL p50 / p99 ms | p99 ratio |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for r in result.itl:
        lines.append(f"| {r.path} | {r.scenario} | {r.outcomes} | {r.interference_ms:.0f} | {_pair(r.idle_ms)} | "
                     f"{_pair(r.loaded_ms)} | {r.ratio:.2f}x |")
    parts = []
    for path in PATHS:
        worst = max((r for r in result.itl if r.path == path), key=lambda r: r.ratio)
        parts.append(f"{path} worst {worst.ratio:.2f}x ({worst.scenario}; "
                     f"{_verdict(worst.ratio <= ITL_TARGET)})")
    return lines + ["", f"Target (issue 36): interfered ITL p99 <= {ITL_TARGET}x idle: " + "; ".join(parts) + "."]


def health_lines(result: LatencyResult) -> list[str]:
    lines = [
        "### (b) Health checks during full-load decode",
        "",
        f"grpc.health.v1 `Check` and HTTP `GET /health`, alternating every 25 ms from the measuring client (one",
        f"connection each), idle for 1.5 s and then while {result.sizes['batch']} streams of "
        f"{result.sizes['health_tokens']} tokens decode at once (counted from",
        "the last stream's first token to the first stream's last token).",
        "",
        "| path | probe | idle p50 / p99 ms | full load p50 / p99 ms | probes at full load |",
        "|---|---|---:|---:|---:|",
    ]
    for r in result.health:
        lines.append(f"| {r.path} | {r.kind} | {_pair(r.idle_ms, 2)} | {_pair(r.load_ms, 2)} | {r.count} |")
    parts = [f"{r.path}, {r.kind} {r.load_ms[1]:.1f} ms ({_verdict(r.load_ms[1] <= HEALTH_TARGET_MS)})"
             for r in result.health]
    return lines + ["", f"Target (issue 36): health p99 <= {HEALTH_TARGET_MS:g} ms at batch {result.sizes['batch']}: "
                    + "; ".join(parts) + "."]


def structured_lines(result: LatencyResult) -> list[str]:
    s = result.structured
    rounds = "; ".join(", ".join(f"{v:.2f}x" for v in r) for r in s.round_ratios)
    process = s.ratios[PATHS.index("engine process")]
    return [
        "### (c) Section 8's structured batch, served",
        "",
        f"Batch 16, prompts of ~32 tokens, greedy, {result.sizes['structured_tokens']} tokens; 8 rows constrained "
        "by section 8's JSON Schema, 8 free (`ignore_eos`).",
        "In-process: section 8's loop on an engine stepped on this process's main thread (decode steps only).",
        "Served: the same 16 requests through gRPC, decode rate counted by the client while all 16 stream",
        "(section 4's count). Best round each; ratios are medians of the rounds' served / in-process.",
        "",
        "| in-process tok/s | " + " | ".join(f"{p} tok/s" for p in PATHS) + " | "
        + " | ".join(f"{p} / in-process" for p in PATHS) + " |",
        "|---:|" + "---:|" * (2 * len(PATHS)),
        f"| {s.in_process_tok_s:.1f} | " + " | ".join(f"{v:.1f}" for v in s.served_tok_s) + " | "
        + " | ".join(f"{v:.2f}x" for v in s.ratios) + " |",
        "",
        f"Rounds (engine process, engine thread): {rounds}. Target (issue 36): the structured batch served "
        f"through the engine process no slower than in-process: {process:.2f}x ({_verdict(process >= 1.0)}).",
    ]


def report(result: LatencyResult, quick: bool) -> str:
    load = ", ".join("n/a" if math.isnan(v) else f"{v:.1f}" for v in result.load_avg)
    lines = [
        "## 14. Latency under interference (issue 36)",
        "",
        "`bench/latency_bench.py`" + (" --quick" if quick else "") + ": default model, float32, the real server"
        " (gRPC + HTTP) on loopback in the bench's process, both EngineClient implementations side by side:",
        "*engine process* (`--engine-process on`) and *engine thread* (`off`), alternating within each round. The",
        "clients run in two spawned processes of their own: one only measures (the stream, the health prober),",
        "the other sends the load. `max_input_tokens` is "
        f"{result.max_input_tokens} here so that the byte bound (`max_input_tokens` x the",
        "longest token's UTF-8 bytes) lets a 3.9 MB prompt reach the tokenizer; at the default 3072 such a",
        "prompt is refused by its size, untokenized. Load average (1 min) at the start, middle and end of the",
        f"run: {load}.",
        "",
    ]
    return "\n".join(lines + itl_lines(result) + [""] + health_lines(result) + [""] + structured_lines(result)
                     + [""])

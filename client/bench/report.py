"""Print a run's statistics as a table, write the JSON result file, draw PNG plots (Agg)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Sequence

from .config import BenchConfig
from .stats import BenchStats, Summary


def load_label(config: BenchConfig) -> str:
    if config.mode == "closed":
        return f"concurrency {config.concurrency}"
    cap = f", max {config.max_concurrency} in flight" if config.max_concurrency else ""
    return f"request rate {config.request_rate:g}/s{cap}"


def _ms(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.2f}"


def text_table(config: BenchConfig, stats: BenchStats) -> str:
    """A vllm-bench-serve style block of results."""
    zipf = f" s={config.zipf_s:g}" if config.popularity == "zipf" else ""
    adapters = f"{len(config.adapters)} ({config.popularity}{zipf})" if config.adapters else "none (base model)"
    workload = config.workload if config.workload == "random" else (
        f"{config.workload} (system prompt {config.prefix_len} tokens"
        f"{f', {config.turns} turns' if config.workload == 'multi-turn' else ''})")
    rows = [("Load", load_label(config)), ("Workload", workload), ("Adapters", adapters),
            ("Successful requests", str(stats.completed)), ("Failed requests", str(stats.failed)),
            ("Benchmark duration (s)", f"{stats.duration_s:.2f}"),
            ("Total input tokens", str(stats.prompt_tokens)),
            ("Input tokens from prefix cache", str(stats.cached_prompt_tokens)),
            ("Total generated tokens", str(stats.output_tokens)),
            ("Request throughput (req/s)", f"{stats.request_throughput:.2f}"),
            ("Output token throughput (tok/s)", f"{stats.output_throughput:.2f}"),
            ("Total token throughput (tok/s)", f"{stats.total_token_throughput:.2f}")]
    if stats.goodput is not None:
        rows.append(("Goodput (req/s)", f"{stats.goodput:.2f}"))
    rows += [(f"Errors {code}", str(count)) for code, count in stats.errors.items()]
    width = max(len(name) for name, _ in rows) + 2
    lines = ["=" * 20 + " loraplex bench " + "=" * 20]
    lines += [f"{name:<{width}}{value}" for name, value in rows]
    lines.append(f"{'metric (ms)':<{width}}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}")
    for name, summary in (("TTFT", stats.ttft), ("TPOT", stats.tpot), ("ITL", stats.itl), ("E2E latency", stats.e2e)):
        lines.append(f"{name:<{width}}" + "".join(f"{_ms(v):>10}" for v in
                                                  (summary.mean_ms, summary.p50_ms, summary.p90_ms, summary.p99_ms)))
    lines.append("=" * 56)
    return "\n".join(lines)


def _jsonable(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def run_record(config: BenchConfig, stats: BenchStats) -> dict:
    """One run as a JSON-ready dict: {'config': ..., 'stats': ...} (NaN -> null)."""
    return _jsonable({"config": dataclasses.asdict(config), "stats": stats.to_dict()})


def write_json(path: Path, runs: Sequence[dict], meta: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**meta, "runs": list(runs)}, indent=2) + "\n")


def plot_against(x_values: Sequence[float], stats: Sequence[BenchStats], x_label: str, path: Path,
                 title: str = "") -> Path:
    """Two panels: output tok/s and request/s, and TTFT/TPOT p50 and p99, against `x_values`."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(x_values, [s.output_throughput for s in stats], "o-", label="output tok/s")
    left.set_xlabel(x_label)
    left.set_ylabel("output tokens/s")
    twin = left.twinx()
    twin.plot(x_values, [s.request_throughput for s in stats], "s--", color="tab:orange", label="req/s")
    twin.set_ylabel("requests/s")
    left.set_title("throughput")
    for name, pick in (("TTFT", lambda s: s.ttft), ("TPOT", lambda s: s.tpot)):
        summaries: list[Summary] = [pick(s) for s in stats]
        right.plot(x_values, [m.p50_ms for m in summaries], "o-", label=f"{name} p50")
        right.plot(x_values, [m.p99_ms for m in summaries], "x:", label=f"{name} p99")
    right.set_xlabel(x_label)
    right.set_ylabel("ms")
    right.set_title("latency")
    right.legend()
    if len(set(x_values)) > 1 and min(x_values) > 0 and max(x_values) / min(x_values) >= 50:
        left.set_xscale("log")
        right.set_xscale("log")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_sweep(configs: Sequence[BenchConfig], stats: Sequence[BenchStats], plot_dir: Path) -> Path:
    """Throughput and latency against the load level of a sweep (concurrency or request rate)."""
    closed = configs[0].mode == "closed"
    x_values = [float(c.concurrency if closed else c.request_rate) for c in configs]
    name = "concurrency" if closed else "request_rate"
    return plot_against(x_values, stats, "concurrency" if closed else "request rate (req/s)",
                        plot_dir / f"bench_vs_{name}.png", title=f"loraplex bench: load sweep ({name})")

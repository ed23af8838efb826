"""Options of `loraplex bench` as one typed dataclass, built from argparse."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class LengthSpec:
    """A token-length distribution: 'fixed' (always `low`) or 'uniform' (integers in [low, high])."""

    kind: str
    low: int
    high: int

    @staticmethod
    def parse(text: str, what: str) -> "LengthSpec":
        """'128' -> fixed 128; '64:256' -> uniform 64..256 inclusive."""
        try:
            parts = [int(p) for p in text.split(":")]
        except ValueError:
            raise ValueError(f"{what}: expected N or LOW:HIGH (integers), got {text!r}") from None
        if len(parts) == 1:
            parts = parts * 2
        if len(parts) != 2 or parts[0] < 1 or parts[1] < parts[0]:
            raise ValueError(f"{what}: expected N >= 1 or LOW:HIGH with 1 <= LOW <= HIGH, got {text!r}")
        return LengthSpec("fixed" if parts[0] == parts[1] else "uniform", parts[0], parts[1])


WORKLOADS = ("random", "shared-prefix", "multi-turn")


@dataclass(frozen=True)
class BenchConfig:
    """Everything one benchmark run needs. Times in seconds; SLOs in milliseconds."""

    num_prompts: int = 100
    concurrency: int | None = None          # closed loop: this many requests in flight
    request_rate: float | None = None       # open loop: Poisson arrivals per second (inf = all at once)
    max_concurrency: int | None = None      # cap on in-flight requests in open loop
    input_len: LengthSpec = LengthSpec("fixed", 128, 128)
    output_len: LengthSpec = LengthSpec("fixed", 64, 64)
    prompt_file: Path | None = None         # one prompt per line (or a JSON list of strings)
    adapters: tuple[str, ...] = ()          # adapter ids; empty = base model only
    popularity: str = "uniform"             # 'uniform' or 'zipf'
    zipf_s: float = 1.0
    warmup: int = 2
    seed: int = 0
    slo_ttft_ms: float | None = None
    slo_tpot_ms: float | None = None
    timeout_s: float = 600.0
    progress: bool = True
    labels: dict[str, str] = field(default_factory=dict)   # free-form, copied into the JSON result
    workload: str = "random"                # random | shared-prefix | multi-turn (workload.py)
    prefix_len: int = 440                   # shared-prefix / multi-turn: system prompt tokens per adapter
    turns: int = 8                          # multi-turn: turns per conversation

    def __post_init__(self):
        if self.num_prompts < 1:
            raise ValueError("--num-prompts must be >= 1")
        if (self.concurrency is None) == (self.request_rate is None):
            raise ValueError("give exactly one of --concurrency (closed loop) or --request-rate (open loop)")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError("--concurrency must be >= 1")
        if self.request_rate is not None and self.request_rate <= 0:
            raise ValueError("--request-rate must be > 0 (use 'inf' to send everything at once)")
        if self.popularity not in ("uniform", "zipf"):
            raise ValueError("--popularity must be 'uniform' or 'zipf'")
        if self.zipf_s <= 0:
            raise ValueError("--zipf-s must be > 0")
        if self.warmup < 0:
            raise ValueError("--warmup must be >= 0")
        if self.workload not in WORKLOADS:
            raise ValueError(f"--workload must be one of {', '.join(WORKLOADS)}")
        if self.prefix_len < 1 or self.turns < 1:
            raise ValueError("--prefix-len and --turns must be >= 1")
        if self.workload == "multi-turn" and self.concurrency is None:
            raise ValueError("--workload multi-turn needs --concurrency (conversations in flight)")

    @property
    def mode(self) -> str:
        return "closed" if self.concurrency is not None else "open"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The workload options of `loraplex bench` (connection options come from the CLI)."""
    api = parser.add_argument_group("api")
    api.add_argument("--api", choices=("grpc", "openai"), default="grpc",
                     help="grpc (default, --address) or openai: streamed /v1/completions at --base-url")
    api.add_argument("--base-url", help="OpenAI-compatible base URL for --api openai "
                                        "(default http://127.0.0.1:8000/v1)")
    load = parser.add_argument_group("load")
    load.add_argument("--num-prompts", type=int, default=100, help="measured requests (default 100)")
    load.add_argument("--concurrency", help="closed loop: requests in flight; a list '1,4,16' sweeps")
    load.add_argument("--request-rate", help="open loop: Poisson requests/s ('inf' = all at once); list sweeps")
    load.add_argument("--max-concurrency", type=int, help="open loop: cap on requests in flight")
    load.add_argument("--warmup", type=int, default=2, help="unmeasured requests first (default 2)")
    load.add_argument("--seed", type=int, default=0, help="seed of the workload and arrivals")
    work = parser.add_argument_group("workload")
    work.add_argument("--workload", choices=WORKLOADS, default="random",
                      help="random prompts (default); shared-prefix: each adapter's system prompt "
                           "(--prefix-len tokens) + a fresh question of --input-len; multi-turn: "
                           "conversations of --turns turns, each resending the conversation so far")
    work.add_argument("--prefix-len", type=int, default=440, help="system prompt tokens (default 440)")
    work.add_argument("--turns", type=int, default=8, help="multi-turn: turns per conversation (default 8)")
    work.add_argument("--input-len", default="128", help="prompt tokens: N or LOW:HIGH uniform (default 128)")
    work.add_argument("--output-len", default="64", help="generated tokens: N or LOW:HIGH (default 64)")
    work.add_argument("--prompt-file", type=Path, help="prompts, one per line or a JSON list (overrides --input-len)")
    work.add_argument("--adapters", help="comma-separated adapter ids to spread requests over")
    work.add_argument("--num-adapters", type=int, help="use ids PREFIX0000..PREFIX{N-1} (with --adapter-prefix)")
    work.add_argument("--adapter-prefix", default="bench-", help="prefix of --num-adapters ids (default 'bench-')")
    work.add_argument("--popularity", choices=("uniform", "zipf"), default="uniform", help="adapter popularity")
    work.add_argument("--zipf-s", type=float, default=1.0, help="Zipf exponent (default 1.0)")
    out = parser.add_argument_group("output")
    out.add_argument("--slo-ttft", type=float, metavar="MS", help="goodput: time-to-first-token SLO in ms")
    out.add_argument("--slo-tpot", type=float, metavar="MS", help="goodput: time-per-output-token SLO in ms")
    out.add_argument("--json", dest="json_path", type=Path, metavar="FILE", help="write the result(s) as JSON")
    out.add_argument("--plot-dir", type=Path, help="write PNG plots here (needs matplotlib)")
    out.add_argument("--label", action="append", default=[], metavar="KEY=VALUE", help="tag copied into the JSON")
    out.add_argument("--no-progress", action="store_true", help="no live progress line")


def _numbers(text: str | None, kind, what: str) -> list:
    if text is None:
        return [None]
    try:
        return [kind(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"{what}: expected a number or a comma-separated list, got {text!r}") from None


def adapter_ids(args: argparse.Namespace) -> tuple[str, ...]:
    """--adapters a,b,c or --num-adapters N (ids PREFIX0000...)."""
    if args.adapters and args.num_adapters:
        raise ValueError("give --adapters or --num-adapters, not both")
    if args.num_adapters is not None:
        if args.num_adapters < 1:
            raise ValueError("--num-adapters must be >= 1")
        return tuple(f"{args.adapter_prefix}{i:04d}" for i in range(args.num_adapters))
    return tuple(a.strip() for a in (args.adapters or "").split(",") if a.strip())


def configs_from_args(args: argparse.Namespace) -> list[BenchConfig]:
    """One BenchConfig per load level (a sweep when --concurrency or --request-rate is a list)."""
    labels = {}
    for item in args.label:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--label: expected KEY=VALUE, got {item!r}")
        labels[key] = value
    common = dict(num_prompts=args.num_prompts, max_concurrency=args.max_concurrency,
                  input_len=LengthSpec.parse(args.input_len, "--input-len"),
                  output_len=LengthSpec.parse(args.output_len, "--output-len"), prompt_file=args.prompt_file,
                  adapters=adapter_ids(args), popularity=args.popularity, zipf_s=args.zipf_s, warmup=args.warmup,
                  seed=args.seed, slo_ttft_ms=args.slo_ttft, slo_tpot_ms=args.slo_tpot, timeout_s=args.timeout,
                  progress=not args.no_progress, labels=labels, workload=args.workload,
                  prefix_len=args.prefix_len, turns=args.turns)
    if args.concurrency is not None and args.request_rate is not None:
        raise ValueError("give --concurrency (closed loop) or --request-rate (open loop), not both")
    if args.request_rate is not None:
        return [BenchConfig(request_rate=rate, **common) for rate in _numbers(args.request_rate, float,
                                                                              "--request-rate")]
    levels = _numbers(args.concurrency, int, "--concurrency") if args.concurrency else [1]
    return [BenchConfig(concurrency=level, **common) for level in levels]

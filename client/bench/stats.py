"""Metrics of one run, with the definitions of `vllm bench serve`.

Per successful request (times from the client's send):
  TTFT  = arrival of the first chunk carrying tokens - send
  E2E   = end of the stream - send
  TPOT  = (E2E - TTFT) / (output_tokens - 1)        (requests with >= 2 output tokens)
  ITL   = every gap between consecutive token-carrying chunks of a request (pooled over requests)
Throughputs divide by the run's duration (first send to last completion). Goodput counts only
requests meeting every given SLO (TTFT <= slo_ttft, TPOT <= slo_tpot; a 1-token request has no
TPOT and passes that SLO). Failed requests count in `errors` (by gRPC status) and nowhere else.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Sequence

from .runner import RequestRecord

PERCENTILES = (50, 90, 99)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile with linear interpolation between order statistics (numpy's default)."""
    if not values:
        return math.nan
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be in [0, 100], got {q}")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass(frozen=True)
class Summary:
    """mean / p50 / p90 / p99 / max of one latency metric, in milliseconds (nan when empty)."""

    count: int
    mean_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float

    @staticmethod
    def of(seconds: Sequence[float]) -> "Summary":
        ms = [s * 1000 for s in seconds]
        if not ms:
            return Summary(0, math.nan, math.nan, math.nan, math.nan, math.nan)
        return Summary(len(ms), sum(ms) / len(ms), *(percentile(ms, q) for q in PERCENTILES), max(ms))


@dataclass(frozen=True)
class BenchStats:
    """Everything the report prints; `asdict` gives the JSON form."""

    completed: int
    failed: int
    errors: dict[str, int]                 # gRPC status code name -> count
    duration_s: float
    prompt_tokens: int
    output_tokens: int
    request_throughput: float              # successful requests / s
    output_throughput: float               # generated tokens / s
    total_token_throughput: float          # (prompt + generated) tokens / s
    goodput: float | None                  # requests meeting the SLOs / s; None without SLOs
    slo_ttft_ms: float | None
    slo_tpot_ms: float | None
    ttft: Summary
    tpot: Summary
    itl: Summary
    e2e: Summary
    cached_prompt_tokens: int = 0          # of prompt_tokens, found in the server's prefix cache

    def to_dict(self) -> dict:
        return asdict(self)


def ttft_s(record: RequestRecord) -> float | None:
    return record.chunk_s[0] - record.sent_s if record.chunk_s else None


def e2e_s(record: RequestRecord) -> float | None:
    return None if record.done_s is None else record.done_s - record.sent_s


def tpot_s(record: RequestRecord) -> float | None:
    first, total = ttft_s(record), e2e_s(record)
    if first is None or total is None or record.output_tokens < 2:
        return None
    return (total - first) / (record.output_tokens - 1)


def itl_s(record: RequestRecord) -> list[float]:
    return [later - earlier for earlier, later in zip(record.chunk_s, record.chunk_s[1:])]


def meets_slo(record: RequestRecord, slo_ttft_ms: float | None, slo_tpot_ms: float | None) -> bool:
    first, per_token = ttft_s(record), tpot_s(record)
    if slo_ttft_ms is not None and (first is None or first * 1000 > slo_ttft_ms):
        return False
    return slo_tpot_ms is None or per_token is None or per_token * 1000 <= slo_tpot_ms


def compute_stats(records: Sequence[RequestRecord], duration_s: float, slo_ttft_ms: float | None = None,
                  slo_tpot_ms: float | None = None) -> BenchStats:
    """The run's metrics from its request records (see the module docstring for definitions)."""
    ok = [r for r in records if r.ok]
    errors = Counter(r.error or "INCOMPLETE" for r in records if not r.ok)
    duration = max(duration_s, 1e-9)
    prompt = sum(r.prompt_tokens or 0 for r in ok)
    output = sum(r.output_tokens for r in ok)
    with_slo = slo_ttft_ms is not None or slo_tpot_ms is not None
    good = sum(meets_slo(r, slo_ttft_ms, slo_tpot_ms) for r in ok)
    return BenchStats(
        completed=len(ok), failed=len(records) - len(ok), errors=dict(sorted(errors.items())),
        duration_s=duration_s, prompt_tokens=prompt, output_tokens=output,
        request_throughput=len(ok) / duration, output_throughput=output / duration,
        total_token_throughput=(prompt + output) / duration,
        goodput=good / duration if with_slo else None, slo_ttft_ms=slo_ttft_ms, slo_tpot_ms=slo_tpot_ms,
        ttft=Summary.of([v for r in ok if (v := ttft_s(r)) is not None]),
        tpot=Summary.of([v for r in ok if (v := tpot_s(r)) is not None]),
        itl=Summary.of([gap for r in ok for gap in itl_s(r)]),
        e2e=Summary.of([v for r in ok if (v := e2e_s(r)) is not None]),
        cached_prompt_tokens=sum(r.cached_tokens for r in ok))

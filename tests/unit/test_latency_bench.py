"""bench/latency_bench.py's statistics and section 14's verdict lines, on hand-made numbers."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import latency_bench as lb  # noqa: E402
from latency_report import report  # noqa: E402


def test_percentile_is_nearest_rank():
    values = [float(v) for v in range(1, 101)]          # 1..100
    assert lb.percentile(values, 50) == 50.0
    assert lb.percentile(values, 99) == 99.0
    assert lb.percentile(values, 100) == 100.0
    assert lb.percentile([7.0], 99) == 7.0
    assert lb.percentile([3.0, 1.0, 2.0], 50) == 2.0     # unsorted input


def test_gaps_skip_the_first_tokens_and_only_overlapping_gaps_count():
    times = [0.0, 1.0, 1.1, 1.2, 1.5, 1.6]
    spans = lb.gaps(times)                                # from the third token on
    assert spans == [(1.1, 1.2), (1.2, 1.5), (1.5, 1.6)]
    # a window inside the second gap, one touching no gap, one covering the last gap's end
    got = lb.overlapping(spans, [(1.3, 1.4), (5.0, 6.0), (1.55, 1.58)])
    assert got == pytest.approx([0.3, 0.1])
    assert lb.overlapping(spans, []) == []
    assert lb.overlapping(spans, [(1.2, 1.2)]) == []     # touching an end is not overlapping


def test_window_and_its_rate_count_only_while_every_request_streams():
    records = [{"chunk_s": [1.0, 2.0, 3.0, 4.0], "chunk_tokens": [1, 1, 1, 1]},
               {"chunk_s": [2.0, 2.5, 3.5], "chunk_tokens": [1, 2, 1]}]
    assert lb.window(records) == (2.0, 3.5)
    # tokens arriving in (2.0, 3.5]: 3.0 (1) from the first, 2.5 (2) and 3.5 (1) from the second
    assert lb.window_tok_s(records) == pytest.approx(4 / 1.5)
    assert lb.window_tok_s([{"chunk_s": [1.0], "chunk_tokens": [1]}]) == 0.0


def _result(itl_ratio: float, health_p99: float, structured: float) -> lb.LatencyResult:
    itl = [lb.ItlRow(path, kind, (20.0, 25.0), (21.0, 25.0 * (itl_ratio if path == "engine process" else 1.0)),
                     itl_ratio if path == "engine process" else 1.0, 900.0, "3 x INVALID_ARGUMENT")
           for path in lb.PATHS for kind in ("gRPC, big", "HTTP, big")]
    health = [lb.HealthRow(path, kind, (0.5, 0.9), (1.0, health_p99), 200)
              for path in lb.PATHS for kind in ("gRPC Check", "HTTP /health")]
    rows = lb.StructuredRow(100.0, (100.0 * structured, 90.0), (structured, 0.9), ((structured, 0.9),))
    sizes = dict(itl_tokens=128, batch=64, health_tokens=48, structured_tokens=32)
    return lb.LatencyResult(itl, health, rows, 30000, sizes, (2.0, float("nan"), 3.5))


def test_report_verdicts_follow_the_numbers():
    text = report(_result(itl_ratio=1.1, health_p99=4.0, structured=1.02), quick=False)
    assert text.startswith("## 14. Latency under interference (issue 36)")
    assert "engine process worst 1.10x (gRPC, big; met)" in text
    assert "engine process, gRPC Check 4.0 ms (met)" in text
    assert "no slower than in-process: 1.02x (met)" in text
    assert "run: 2.0, n/a, 3.5." in text and "MISSED" not in text
    text = report(_result(itl_ratio=1.3, health_p99=12.5, structured=0.97), quick=True)
    assert "engine process worst 1.30x (gRPC, big; MISSED)" in text
    assert "engine thread worst 1.00x (gRPC, big; met)" in text
    assert "engine thread, HTTP /health 12.5 ms (MISSED)" in text
    assert "no slower than in-process: 0.97x (MISSED)" in text

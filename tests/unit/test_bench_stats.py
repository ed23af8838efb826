"""`loraplex bench` statistics on synthetic timings with hand-computed answers; workload and options."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from loraplex.client.bench.config import BenchConfig, LengthSpec
from loraplex.client.bench.runner import RequestRecord, poisson_offsets
from loraplex.client.bench.stats import compute_stats, itl_s, percentile, tpot_s, ttft_s
from loraplex.client.bench.workload import adapter_sequence, build_requests, zipf_weights


def record(index, sent, chunks, tokens, done, prompt=10, error=None):
    return RequestRecord(index, None, sent, list(chunks), list(tokens), done, prompt, error)


def test_percentile_matches_numpy_linear_interpolation():
    rng = random.Random(0)
    for n in (1, 2, 5, 100):
        values = [rng.uniform(0, 10) for _ in range(n)]
        for q in (0, 50, 90, 99, 100):
            assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))
    assert percentile([1, 2, 3, 4], 50) == 2.5 and percentile([1, 2, 3, 4], 90) == pytest.approx(3.7)
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError, match="q must be in"):
        percentile([1.0], 101)


def test_ttft_tpot_itl_definitions():
    # sent at 1.0; chunks of 1, 2, 1 tokens at 1.5, 1.7, 2.0; done at 2.1 -> 4 tokens
    r = record(0, 1.0, [1.5, 1.7, 2.0], [1, 2, 1], 2.1)
    assert ttft_s(r) == pytest.approx(0.5)
    assert tpot_s(r) == pytest.approx((1.1 - 0.5) / 3)      # (E2E - TTFT) / (tokens - 1)
    assert itl_s(r) == pytest.approx([0.2, 0.3])            # gaps between chunks
    single = record(1, 0.0, [0.4], [1], 0.5)
    assert tpot_s(single) is None and itl_s(single) == []


def test_compute_stats_known_answers():
    records = [record(0, 0.0, [0.1, 0.2, 0.3], [1, 1, 1], 0.3),      # ttft 100 ms, tpot 100 ms
               record(1, 0.0, [0.3, 0.35, 0.4], [1, 1, 1], 0.4),     # ttft 300 ms, tpot 50 ms
               record(2, 0.5, [0.6, 0.8], [1, 1], 1.0),              # ttft 100 ms, tpot 400 ms
               record(3, 0.5, [], [], None, error="RESOURCE_EXHAUSTED"),
               record(4, 0.6, [], [], None, error="RESOURCE_EXHAUSTED"),
               record(5, 0.7, [0.8], [1], None, error="DEADLINE_EXCEEDED")]
    stats = compute_stats(records, duration_s=2.0, slo_ttft_ms=200, slo_tpot_ms=150)
    assert stats.completed == 3 and stats.failed == 3
    assert stats.errors == {"DEADLINE_EXCEEDED": 1, "RESOURCE_EXHAUSTED": 2}
    assert stats.output_tokens == 8 and stats.prompt_tokens == 30
    assert stats.request_throughput == pytest.approx(1.5) and stats.output_throughput == pytest.approx(4.0)
    assert stats.total_token_throughput == pytest.approx(19.0)
    assert stats.goodput == pytest.approx(0.5)     # only request 0 meets TTFT <= 200 and TPOT <= 150
    assert stats.ttft.mean_ms == pytest.approx(500 / 3) and stats.ttft.p50_ms == pytest.approx(100)
    assert stats.ttft.p90_ms == pytest.approx(260) and stats.ttft.max_ms == pytest.approx(300)
    assert stats.tpot.p50_ms == pytest.approx(100) and stats.tpot.mean_ms == pytest.approx(550 / 3)
    assert stats.itl.count == 5 and stats.itl.p50_ms == pytest.approx(100)
    assert stats.e2e.mean_ms == pytest.approx(400) and stats.e2e.p99_ms == pytest.approx(498.0)   # 400 + 0.98 * 100


def test_goodput_single_slo_and_none_without_slo():
    records = [record(0, 0.0, [0.1, 0.2], [1, 1], 0.2), record(1, 0.0, [0.5, 0.6], [1, 1], 0.6)]
    assert compute_stats(records, 1.0).goodput is None
    assert compute_stats(records, 1.0, slo_ttft_ms=200).goodput == pytest.approx(1.0)
    assert compute_stats(records, 1.0, slo_tpot_ms=50).goodput == pytest.approx(0.0)
    empty = compute_stats([], 1.0)
    assert empty.completed == 0 and math.isnan(empty.ttft.p50_ms)


def test_zipf_popularity_and_lengths_are_seeded():
    weights = zipf_weights(4, 1.0)
    assert weights == pytest.approx([12 / 25, 6 / 25, 4 / 25, 3 / 25])
    picks = adapter_sequence(("a", "b", "c", "d"), "zipf", 1.0, 20_000, random.Random(1))
    assert picks.count("a") / len(picks) == pytest.approx(0.48, abs=0.02)
    assert adapter_sequence((), "zipf", 1.0, 3, random.Random(1)) == [None, None, None]
    config = BenchConfig(num_prompts=50, concurrency=2, input_len=LengthSpec.parse("8:16", "x"),
                         output_len=LengthSpec.parse("4", "y"), adapters=("a", "b"))
    first, again = build_requests(config), build_requests(config)
    assert first == again and {r.max_new_tokens for r in first} == {4}
    assert all(8 <= len(r.prompt.split()) <= 16 for r in first) and {r.adapter_id for r in first} == {"a", "b"}


def test_poisson_offsets_have_the_requested_rate():
    offsets = poisson_offsets(20_000, 50.0, random.Random(3))
    assert offsets[0] == 0 and offsets == sorted(offsets)
    assert (len(offsets) - 1) / offsets[-1] == pytest.approx(50.0, rel=0.03)
    assert poisson_offsets(3, math.inf, random.Random(0)) == [0.0, 0.0, 0.0]


def test_options_say_what_to_fix():
    with pytest.raises(ValueError, match="exactly one of --concurrency"):
        BenchConfig(concurrency=2, request_rate=1.0)
    with pytest.raises(ValueError, match="LOW:HIGH"):
        LengthSpec.parse("9:3", "--input-len")

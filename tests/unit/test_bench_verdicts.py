"""`make bench` verdict lines (bench/suite.py) on hand-made numbers: met / MISSED per target."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import suite  # noqa: E402


def test_backend_verdicts_apply_each_backends_own_targets():
    line = suite.backend_verdicts({"bnb-nf4": (1.49, 1.3), "bnb-int8": (1.31, 1.0), "hqq-2bit": (1.0, 0.5)})
    assert "bnb-nf4 1.49x / 1.30x (>= 1.5x b1, >= 1.0x b16: MISSED)" in line
    assert "bnb-int8 1.31x / 1.00x (>= 1.3x b1, >= 1.0x b16: met)" in line
    assert "hqq-2bit 1.00x / 0.50x (>= 1.0x b1: met)" in line          # no batch-16 target
    assert "eetq" not in line                                          # not measured, not judged


def test_floor_verdict_takes_the_better_floor_and_states_the_time_left():
    rows = [SimpleNamespace(batch=1, engine_tok_s=19.0, floor_tok_s=20.0, engine_floor_tok_s=15.0),
            SimpleNamespace(batch=16, engine_tok_s=100.0, floor_tok_s=80.0, engine_floor_tok_s=125.0)]
    line = suite.floor_verdict(rows)
    assert "MISSED" in line and "batch 1 0.950x best/best" in line and "batch 16 0.800x best/best" in line
    assert "(32.0 ms per step besides the GEMMs, best/best)" in line   # 16 * (1/100 - 1/125) s
    rows[1].engine_tok_s = 120.0
    assert ": met;" in suite.floor_verdict(rows)
    rows[1].paired_floor_ratio = 0.94        # the engine-GEMM floor is the better one: paired judges
    line = suite.floor_verdict(rows)
    assert "MISSED" in line and "batch 16 0.940x paired" in line
    rows[0].paired_floor_ratio = 0.5         # not used: F.linear is the better floor at batch 1
    assert "batch 1 0.950x best/best" in suite.floor_verdict(rows)


def _ops(batch, step_ms, gemms_ms, attention_ms, kv_bytes, other_ms=0.0):
    import step_ops_bench

    ms = {"GEMMs": gemms_ms, "norms": other_ms, "rotary + K/V write": 0.0, "attention": attention_ms,
          "SiLU·up": 0.0}
    return step_ops_bench.StepOps(batch, step_ms, ms, kv_bytes)


def test_step_ops_bound_only_for_missed_batches_and_from_the_ops_run_alone():
    rows = [SimpleNamespace(batch=1, engine_tok_s=20.0, floor_tok_s=10.0, engine_floor_tok_s=19.0,
                            paired_floor_ratio=1.02),
            SimpleNamespace(batch=16, engine_tok_s=100.0, floor_tok_s=50.0, engine_floor_tok_s=105.0,
                            paired_floor_ratio=0.93)]
    # batch 1: 40 ms of GEMMs + 10 ms rest stream 500 MB -> 10 GB/s
    ops = [_ops(1, 52.0, 40.0, 2.0, 1e6), _ops(16, 110.0, 80.0, 8.0, 40e6, other_ms=2.0)]
    line = suite.step_ops_bound(rows, ops, 500_000_000)
    assert line.startswith("Bound: the batch-1 step streams its weights at 10.0 GB/s")
    # batch 16: floor work 80 + 20 rest = 100 ms; attention at 10 GB/s 4 ms + norms 2 ms -> 100 / 106
    assert "at most 0.94x at batch 16 " in line and "batch 1 " not in line
    rows[1].paired_floor_ratio = 0.95
    assert suite.step_ops_bound(rows, ops, 500_000_000) == ""          # every batch met


def test_served_comparison_judges_the_median_of_the_rounds_ratios():
    from grpc_bench import Comparison, SideResult, comparison_section

    def side(tok_s):
        return SideResult(tok_s=tok_s, req_s=tok_s / 32, ttft_p50_ms=100.0)

    # round 1 ran in a slow minute for the served side only (0.70x); rounds 2 and 3 agree (0.90x, 0.95x)
    comparison = Comparison(16, 48, 64, 32, (side(50.0), side(40.0), side(40.0)), (side(35.0), side(36.0), side(38.0)))
    assert comparison.round_ratios == [0.7, 0.9, 0.95]
    assert comparison.ratio == 0.9 and round(comparison.mean_ratio, 3) == round(109 / 130, 3)
    text = comparison_section("## 9. t", "intro", ("serve", "fleet"), comparison, "fleet / serve", 0.85)
    assert "| serve | 43.3 |" in text and "| fleet | 36.3 |" in text                 # rows: means of the runs
    assert "fleet / serve = 0.900x, median of the rounds (0.700x, 0.900x, 0.950x); mean / mean 0.838x" in text
    assert "(target >= 0.85x: met)" in text
    assert "MISSED" in comparison_section("t", "i", ("a", "b"), comparison, "b / a", 0.91)

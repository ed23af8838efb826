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

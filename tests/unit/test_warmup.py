"""The start-up warm-up runs the adapter path (zero adapter, prefill and decode) and cleans up."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine_helpers import greedy_request, make_engine, tokens_of
from loraplex.server.engine.warmup import WARMUP_RANK, warm_up
from loraplex.server.lora.ops import select_ops
from loraplex.server.lora.slot_pool import SlotPool


@pytest.fixture(scope="module")
def model_dir(tiny_llama_dir) -> Path:
    return tiny_llama_dir


class RecordingOps:
    """The real torch LoRA ops, recording the token count of every delta call."""

    def __init__(self, fail: bool = False):
        self.inner = select_ops("cpu")
        self.name = "recording"
        self.calls: list[int] = []
        self.fail = fail

    def prepare(self, info, scales):
        return self.inner.prepare(info, scales)

    def add_delta(self, x, y, weights, step):
        if self.fail:
            raise RuntimeError("kernel launch failed")
        self.calls.append(x.shape[0])
        self.inner.add_delta(x, y, weights, step)


def _engine_and_pool(model_dir, ops):
    """An engine without a store, then a pool wired to its runner as build_engine wires one."""
    engine = make_engine(model_dir)
    pool = SlotPool(engine.runner.model.lora_targets(), 2, 32, torch.float32, "cpu", ops=ops)
    engine.runner.lora = pool
    return engine, pool


def test_build_engine_with_a_store_warms_the_adapter_path(model_dir, tmp_path):
    from loraplex.adapters_store.store import AdapterStore, StoreConfig
    from loraplex.server.engine.builder import base_spec_for, build_engine
    from loraplex.server.engine.config import EngineConfig

    config = EngineConfig.from_settings(model_dir, method="none", dtype="float32", device="cpu",
                                        kv_cache_memory="64MiB", max_model_len=256, max_input_tokens=128)
    store = AdapterStore(tmp_path / "store", StoreConfig(), base_spec_for(config))
    lines: list[str] = []
    try:
        engine, _info = build_engine(config, store, log=lines.append)
        assert any("warm-up: a request through a zero rank-16 adapter ran" in ln for ln in lines), lines
        pool = engine.runner.lora
        assert pool.stack_rank == 1 and max(pool.slot_ranks) == 0 and not pool.scales.any()
        assert engine.adapters.manager.loads == 0 and engine.adapters.manager.num_loaded == 0
    finally:
        store.close()


def test_warm_up_runs_prefill_and_decode_through_an_adapter_then_cleans_up(model_dir):
    ops = RecordingOps()
    engine, pool = _engine_and_pool(model_dir, ops)
    lines: list[str] = []
    warm_up(engine, pool, log=lines.append)
    assert not any("warning" in ln for ln in lines), lines
    num_targets = len(pool.targets)
    assert ops.calls[:num_targets] == [5] * num_targets          # the 5-token prompt (prefill)
    assert ops.calls[num_targets:] == [1] * num_targets          # one decode step
    assert pool.stack_rank == 1                                  # loaded at rank 16, then shrunk
    assert max(pool.slot_ranks) == 0 and not pool.scales.any()
    assert engine.adapters is None and not engine.has_work()
    assert WARMUP_RANK <= pool.max_lora_rank
    outputs = {}
    engine.add_request(greedy_request("after", [5, 6, 7], 3))
    while engine.has_work():
        for out in engine.step()[0]:
            outputs.setdefault(out.request_id, []).append(out)
    assert len(tokens_of(outputs["after"])) == 3


def test_a_broken_adapter_path_fails_the_warm_up(model_dir):
    engine, pool = _engine_and_pool(model_dir, RecordingOps(fail=True))
    with pytest.raises(RuntimeError, match="warm-up request __warmup_adapter__ failed"):
        warm_up(engine, pool)
    assert engine.adapters is None

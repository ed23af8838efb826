"""Slot pool layout (rank padding, re-layout, clear), adapter manager (LRU, limits), fingerprint."""

from __future__ import annotations

import pytest
import torch

from error_bounds import assert_within, dot_bound
from lora_helpers import HIDDEN, make_adapter, make_targets, oracle_delta
from loraplex.server.lora.batch_info import LoraBatchInfo
from loraplex.server.lora.fingerprint import base_fingerprint, base_spec_from_model_config
from loraplex.server.lora.manager import AdapterManager, TooManyAdapters
from loraplex.server.lora.ops import TorchOps
from loraplex.server.lora.slot_pool import SlotPool


def _pool(max_loras=3, max_rank=8, reserve=False):
    targets = make_targets()
    return SlotPool(targets, max_loras, max_rank, torch.float32, "cpu", ops=TorchOps(), reserve=reserve), targets


def _delta(pool, target, slots):
    """The target's delta for one step, routed the way the runner does it (pool.prepare_step)."""
    x = torch.randn(len(slots), target.in_features, generator=torch.Generator().manual_seed(5))
    y = torch.zeros(len(slots), target.out_features)
    target.lora.add_delta(x, y, pool.prepare_step(LoraBatchInfo.from_token_slots(torch.tensor(slots))))
    return x, y


def assert_delta_within_bound(y: torch.Tensor, target, x: torch.Tensor, token_adapters, what: str) -> None:
    """y (a zero-started delta) within the bound of its float32 sums (shrink over in_features,
    expand over the pool's padded rank, the scale, the add into y: any order) of the exact
    delta; the padded ranks add exact zeros, so a re-layout only reorders the sums."""
    terms = x.shape[1] + 16 + 2                                             # pools here: rank <= 16
    exact = oracle_delta(target, x, token_adapters)
    assert_within(y, exact, dot_bound(oracle_delta(target, x, token_adapters, absolute=True), terms), what=what)


def test_load_pads_rank_zeroes_untargeted_and_attaches_hooks():
    pool, targets = _pool()
    adapter = make_adapter("a@1", rank=3, seed=1, modules=("q_proj", "v_proj"))
    pool.load(1, adapter)
    assert all(t.lora is not None for t in targets)
    qkv = pool.weights[0]
    assert pool.stack_rank == 3 and qkv.a.shape == (3, 3 * 3, HIDDEN)
    assert torch.equal(qkv.a[1, 0:3], adapter.weights[(0, "q_proj")][0])                  # copied as is
    assert qkv.a[1, 3:6].abs().sum() == 0                                  # k_proj not targeted
    assert torch.equal(qkv.bts[2][1], adapter.weights[(0, "v_proj")][1].T)
    assert pool.weights[1].a[1].abs().sum() == 0                           # o_proj not targeted
    assert pool.scales[1].item() == pytest.approx(adapter.config.scaling)


def test_rank_growth_relayout_keeps_loaded_slots_and_clear_shrinks():
    pool, targets = _pool(max_rank=16)
    small, big = make_adapter("s@1", rank=2, seed=1), make_adapter("b@1", rank=12, seed=2)
    pool.load(0, small)
    per_token = [small, small, None]
    x, before = _delta(pool, targets[2], [0, 0, -1])
    assert_delta_within_bound(before, targets[2], x, per_token, "rank 2 stack")
    pool.load(2, big)
    assert pool.stack_rank == 12
    _, after = _delta(pool, targets[2], [0, 0, -1])
    assert_delta_within_bound(after, targets[2], x, per_token, "after the re-layout to rank 12")
    pool.clear(2)
    assert pool.stack_rank == 2
    _, shrunk = _delta(pool, targets[2], [0, 0, -1])
    assert_delta_within_bound(shrunk, targets[2], x, per_token, "after shrinking back to rank 2")


def test_reserve_allocates_max_rank_up_front():
    pool, _ = _pool(max_rank=8, reserve=True)
    assert pool.stack_rank == 8
    pool.load(0, make_adapter("a@1", rank=4, seed=1))
    assert pool.stack_rank == 8


def test_clear_zeroes_slot():
    pool, targets = _pool()
    pool.load(0, make_adapter("a@1", rank=4, seed=1))
    pool.clear(0)
    assert all(w.a[0].abs().sum() == 0 and all(bt[0].abs().sum() == 0 for bt in w.bts) for w in pool.weights)
    assert _delta(pool, targets[0], [0, 0])[1].abs().sum() == 0


def test_load_rejects_bad_adapters():
    pool, _ = _pool(max_rank=4)
    with pytest.raises(ValueError, match="max_lora_rank"):
        pool.load(0, make_adapter("big@1", rank=6, seed=1))
    with pytest.raises(ValueError, match="not a LoRA target"):
        pool.load(0, make_adapter("deep@1", rank=2, seed=1, num_layers=3))
    bad = make_adapter("bad@1", rank=2, seed=1, modules=("q_proj",))
    bad.weights[(0, "q_proj")] = (torch.zeros(2, HIDDEN + 1), torch.zeros(HIDDEN, 2))
    with pytest.raises(ValueError, match="the base needs A"):
        pool.load(0, bad)
    with pytest.raises(IndexError):
        pool.load(3, make_adapter("a@1", rank=2, seed=1))


class _Source:
    """get_loaded for the manager: builds adapters on demand and counts calls."""

    def __init__(self):
        self.calls: list[str] = []

    def __call__(self, key: str):
        self.calls.append(key)
        return make_adapter(key, rank=2, seed=sum(map(ord, key)))


def test_manager_lowest_free_first_and_lru_eviction_outside_batch():
    pool, _ = _pool(max_loras=3)
    manager, source = AdapterManager(pool), _Source()
    assert manager.activate({"a", "b", "c"}, source) == {"a": 0, "b": 1, "c": 2}
    manager.activate({"a"}, source)                       # b is now the least recently used
    slots = manager.activate({"c", "d"}, source)          # b evicted, not c (in the batch)
    assert slots == {"c": 2, "d": 1} and manager.slot_of("b") is None
    slots = manager.activate({"b", "d", "c"}, source)     # a is LRU and not in the batch
    assert slots == {"b": 0, "c": 2, "d": 1}
    assert manager.stats().loads == 5 and manager.stats().evictions == 2
    assert source.calls == ["a", "b", "c", "d", "b"]
    assert manager.num_loaded == 3
    assert manager.resident_keys() == ("c", "d", "b")       # LRU first (residency metrics)


def test_manager_resident_keys_are_not_reloaded():
    pool, _ = _pool()
    manager, source = AdapterManager(pool), _Source()
    manager.activate({"a", "b"}, source)
    manager.activate({"b", "a"}, source)
    assert source.calls == ["a", "b"] and manager.loads == 2


def test_manager_too_many_adapters():
    pool, _ = _pool(max_loras=2)
    manager = AdapterManager(pool)
    with pytest.raises(TooManyAdapters, match="--max-loras"):
        manager.activate({"a", "b", "c"}, _Source())


def test_manager_evict_then_reload_restores_weights():
    pool, targets = _pool()
    manager, source = AdapterManager(pool), _Source()
    manager.activate({"x", "y"}, source)
    adapter_y = _Source()("y")                            # the same weights the manager loads
    x, before = _delta(pool, targets[3], [manager.slot_of("y")] * 2)
    assert_delta_within_bound(before, targets[3], x, [adapter_y] * 2, "before the eviction")
    assert manager.evict("y") and not manager.evict("y") and manager.evictions == 1
    assert pool.slot_ranks[1] == 0
    slots = manager.activate({"y"}, source)
    _, after = _delta(pool, targets[3], [slots["y"]] * 2)
    assert_delta_within_bound(after, targets[3], x, [adapter_y] * 2, "after the reload")


def test_failed_load_leaves_slot_free():
    pool, _ = _pool()
    manager = AdapterManager(pool)

    def broken(key):
        raise OSError("disk gone")

    with pytest.raises(OSError):
        manager.activate({"a"}, broken)
    assert manager.num_loaded == 0
    assert manager.activate({"b"}, _Source()) == {"b": 0}


class _HfStyle:
    architectures = ["LlamaForCausalLM"]
    hidden_size, intermediate_size, num_attention_heads, num_key_value_heads = 576, 1536, 9, 3
    head_dim, num_hidden_layers, vocab_size = 64, 30, 49152


def test_fingerprint_and_base_spec():
    spec = base_spec_from_model_config(_HfStyle(), "bnb-nf4")
    assert spec.fingerprint.startswith("llama-30x576-bnb-nf4-") and len(spec.fingerprint.split("-")[-1]) == 12
    assert spec.module_shapes["k_proj"] == (576, 192) and spec.module_shapes["down_proj"] == (1536, 576)
    assert spec.num_layers == 30 and spec.quantization == "bnb-nf4"
    same = base_fingerprint("LlamaForCausalLM", 30, 576, 1536, 9, 3, 64, 49152, "bnb-nf4")
    assert same == spec.fingerprint
    assert base_fingerprint("LlamaForCausalLM", 30, 576, 1536, 9, 3, 64, 49152, "none") != same
    assert base_fingerprint("LlamaForCausalLM", 30, 576, 1536, 9, 3, 64, 49153, "bnb-nf4") != same


def test_base_spec_from_model_config_class():
    from loraplex.server.model.config import ModelConfig

    cfg = ModelConfig.from_dict({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 49152,
        "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
        "num_attention_heads": 9, "num_key_value_heads": 3, "rms_norm_eps": 1e-5,
        "max_position_embeddings": 8192, "rope_theta": 100000.0, "tie_word_embeddings": True,
    })
    assert base_spec_from_model_config(cfg, "bnb-nf4") == base_spec_from_model_config(_HfStyle(), "bnb-nf4")


def test_manager_reports_device_tier_events_to_prometheus():
    from prometheus_client.parser import text_string_to_metric_families

    from loraplex.adapters_store.cache import metrics_hook
    from loraplex.server.metrics import Metrics

    pool, _ = _pool(max_loras=3)
    manager, source, metrics = AdapterManager(pool), _Source(), Metrics()
    manager.set_event_hook(metrics_hook(metrics, tier="device"))
    manager.activate({"a", "b", "c"}, source)             # 3 misses, 3 loads
    manager.activate({"a"}, source)                       # 1 hit
    manager.activate({"c", "d"}, source)                  # 1 hit, 1 miss, b evicted
    manager.evict("d")                                    # explicit eviction
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(metrics.render().decode())
               for s in family.samples}
    device = (("tier", "device"),)
    assert samples[("loraplex_adapter_cache_misses_total", device)] == 4
    assert samples[("loraplex_adapter_cache_hits_total", device)] == 2
    assert samples[("loraplex_adapter_loads_total", device)] == 4
    assert samples[("loraplex_adapter_evictions_total", device)] == 2
    assert samples[("loraplex_adapter_load_seconds_count", device)] == 4


def test_broken_event_hook_does_not_break_activation():
    pool, _ = _pool()
    manager = AdapterManager(pool)
    manager.set_event_hook(lambda name, value: 1 / 0)
    assert manager.activate({"a"}, _Source()) == {"a": 0}

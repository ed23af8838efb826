"""Adapter residency gauges (issue 35): per tier, public ids named, private ones counted only,
labels bounded, read at scrape time; the real slot manager and host cache feed them."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from loraplex.server.engine.io import EngineStats
from loraplex.server.metrics import Metrics
from loraplex.server.residency_metrics import MAX_NAMED, watch_residency


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _stats(slots: tuple[str, ...]) -> EngineStats:
    return EngineStats(num_running=0, num_waiting=0, num_free_blocks=1, num_total_blocks=1, num_active_adapters=0,
                       num_loaded_slots=len(slots), last_batch_size=0, last_batch_tokens=0, total_preemptions=0,
                       slot_adapters=slots)


class _Store:
    def __init__(self, keys):
        self.keys = keys

    def host_resident(self):
        return self.keys


def test_tiers_name_public_adapters_count_private_ones_and_follow_changes():
    metrics, state = Metrics(), {"slots": ("tone@1", "secret@2")}
    store = _Store(("tone@1", "secret@2", "legal@3"))
    watch_residency(metrics.registry, lambda: _stats(state["slots"]), store, lambda key: key.startswith("secret"))
    samples = _samples(metrics.render().decode())
    resident = {labels for (name, labels), v in samples.items() if name == "loraplex_adapter_resident" and v == 1}
    assert resident == {(("adapter", "tone@1"), ("tier", "device")), (("adapter", "tone@1"), ("tier", "host")),
                        (("adapter", "legal@3"), ("tier", "host"))}
    assert "secret" not in metrics.render().decode()
    assert samples[("loraplex_adapters_resident", (("tier", "device"),))] == 2
    assert samples[("loraplex_adapters_resident", (("tier", "host"),))] == 3
    assert samples[("loraplex_adapters_resident_unnamed", (("tier", "device"),))] == 1
    state["slots"] = ()                                                 # evicted: the series goes away
    samples = _samples(metrics.render().decode())
    assert not any(name == "loraplex_adapter_resident" and dict(labels)["tier"] == "device"
                   for name, labels in samples)


def test_labels_are_bounded_most_recent_first():
    metrics = Metrics()
    keys = tuple(f"a{i}@1" for i in range(MAX_NAMED + 10))             # least recently used first
    watch_residency(metrics.registry, lambda: _stats(()), _Store(keys), lambda _key: False)
    samples = _samples(metrics.render().decode())
    named = [dict(labels)["adapter"] for (name, labels) in samples if name == "loraplex_adapter_resident"]
    assert len(named) == MAX_NAMED and "a0@1" not in named and f"a{MAX_NAMED + 9}@1" in named
    assert samples[("loraplex_adapters_resident_unnamed", (("tier", "host"),))] == 10


def test_the_host_cache_reports_its_keys_lru_first():
    from loraplex.adapters_store.cache import HostCache
    from lora_helpers import make_adapter

    cache = HostCache(1 << 30)
    for key in ("a@1", "b@1", "c@1"):
        cache.put(make_adapter(key, rank=2, seed=1))
    cache.get("a@1")
    assert cache.keys() == ("b@1", "c@1", "a@1")

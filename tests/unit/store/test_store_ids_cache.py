"""Id grammar and the host-memory LRU cache."""

from __future__ import annotations

import threading

import pytest
import torch

from loraplex.adapters_store.cache import HostCache, metrics_hook
from loraplex.adapters_store.errors import InvalidAdapterId
from loraplex.adapters_store.ids import AdapterRef, make_key, parse_key, parse_ref, validate_name
from loraplex.adapters_store.types import LoadedAdapter, LoraConfigInfo


@pytest.mark.parametrize("ref, expected", [
    ("a", AdapterRef("a")), ("my-adapter_v2.1", AdapterRef("my-adapter_v2.1")), ("A9@3", AdapterRef("A9", 3)),
    ("x" * 128, AdapterRef("x" * 128)), ("n@123456789", AdapterRef("n", 123456789)),
])
def test_parse_ref_accepts_names_and_pinned_versions(ref, expected):
    assert parse_ref(ref) == expected
    assert str(parse_ref(ref)) == ref


@pytest.mark.parametrize("ref, fragment", [
    ("", "empty"), ("../x", "invalid"), ("/etc/passwd", "invalid"), ("a/../../b", "invalid"), ("a..b", "'..'"),
    ("-a", "starting with"), ("a@0", "version"), ("a@01", "version"), ("a@", "version"), ("a@b", "version"),
    ("a@1@2", "version"), ("x" * 129, "1-128"), ("a\x00", "invalid"), ("é", "invalid"),
])
def test_parse_ref_rejects_with_a_reason(ref, fragment):
    with pytest.raises(InvalidAdapterId, match=fragment):
        parse_ref(ref)


def test_keys_round_trip_and_require_a_version():
    assert parse_key(make_key("lora", 7)) == ("lora", 7)
    with pytest.raises(InvalidAdapterId, match="pin a version"):
        parse_key("lora")
    assert validate_name("ok") == "ok"
    assert issubclass(InvalidAdapterId, ValueError)


def _adapter(key: str, nbytes: int) -> LoadedAdapter:
    config = LoraConfigInfo(rank=1, lora_alpha=1.0, use_rslora=False, target_modules=("q_proj",))
    return LoadedAdapter(key=key, config=config, weights={(0, "q_proj"): (torch.zeros(1, 2), torch.zeros(2, 1))},
                         nbytes=nbytes)


def test_lru_evicts_least_recently_used_by_bytes():
    events = []
    cache = HostCache(100, on_event=lambda name, value: events.append(name))
    assert cache.put(_adapter("a@1", 40)) == []
    assert cache.put(_adapter("b@1", 40)) == []
    assert cache.get("a@1") is not None                  # a is now most recently used
    assert cache.put(_adapter("c@1", 40)) == ["b@1"]
    assert not cache.contains("b@1") and cache.contains("a@1") and cache.contains("c@1")
    assert cache.put(_adapter("d@1", 100)) == ["a@1", "c@1"]
    assert cache.get("zzz@1") is None
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.evictions, stats.num_bytes, stats.num_entries) == (1, 1, 3, 100, 1)
    assert events.count("eviction") == 3 and events.count("hit") == 1 and events.count("miss") == 1


def test_lru_skips_oversized_and_refreshes_same_key():
    cache = HostCache(50)
    assert cache.put(_adapter("big@1", 51)) == [] and not cache.contains("big@1")
    cache.put(_adapter("a@1", 30))
    cache.put(_adapter("a@1", 20))
    assert cache.stats().num_bytes == 20
    assert cache.pop("a@1") and not cache.pop("a@1")
    assert cache.stats().num_bytes == 0 and cache.stats().evictions == 0


def test_lru_is_thread_safe_and_stays_within_budget():
    cache = HostCache(1000)

    def worker(offset: int) -> None:
        for i in range(300):
            cache.put(_adapter(f"k{(i + offset) % 37}@1", 10 + (i % 90)))
            cache.get(f"k{i % 37}@1")

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stats = cache.stats()
    assert stats.num_bytes <= 1000 and stats.hits + stats.misses == 1800


def test_broken_hook_does_not_break_the_cache_and_metrics_hook_maps_events():
    calls = []

    class Sink:
        def adapter_cache_hit(self, tier): calls.append(("hit", tier))
        def adapter_cache_miss(self, tier): calls.append(("miss", tier))
        def adapter_evicted(self, tier): calls.append(("evicted", tier))
        def adapter_loaded(self, tier, seconds): calls.append(("loaded", tier, seconds))

    hook = metrics_hook(Sink())
    cache = HostCache(10, on_event=hook)
    cache.put(_adapter("a@1", 10))
    cache.put(_adapter("b@1", 10))
    cache.get("b@1")
    cache.get("a@1")
    cache.record_load(0.5)
    assert calls == [("evicted", "host"), ("hit", "host"), ("miss", "host"), ("loaded", "host", 0.5)]
    cache.set_hook(lambda name, value: 1 / 0)
    assert cache.get("b@1") is not None

"""Adapter residency as a routing contract: which adapters this server holds, per tier.

LoRA-aware routers (Gateway API Inference Extension, llm-d, AIBrix) route on which adapters a
server has *loaded*; `loraplex_lora_requests_info` (gateway_metrics.py) only says which have
requests. Built at scrape time (no stale series), with bounded labels:

- `loraplex_adapter_resident{tier, adapter}` = 1 for each public adapter resident in `tier`
  (`device`: a device slot, ready for the next batch; `host`: host memory, a slot copy away),
  at most MAX_NAMED per tier, most recently used first.
- `loraplex_adapters_resident{tier}`: how many adapters are resident (private ones included).
- `loraplex_adapters_resident_unnamed{tier}`: those not named above (private: tenant-owned
  adapter names are never labels; or beyond MAX_NAMED).

Load latencies per tier and hit/miss counters are `loraplex_adapter_load_seconds{tier}`,
`loraplex_adapter_cache_hits_total{tier}` / `..._misses_total{tier}` (metrics.py).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

from prometheus_client.core import GaugeMetricFamily

MAX_NAMED = 64


class ResidencyCollector:
    """A prometheus_client custom collector over the engine's slots and the store's host cache."""

    def __init__(self, stats: Callable[[], Any], host_keys: Callable[[], tuple[str, ...]],
                 is_private: Callable[[str], bool]):
        self.stats = stats
        self.host_keys = host_keys
        self.is_private = is_private

    def describe(self):
        return list(self._families())

    def collect(self):
        tiers = {"device": self.stats().slot_adapters, "host": self.host_keys()}
        named, counted, unnamed = self._families()
        for tier, keys in tiers.items():
            shown = self._named(reversed(keys))                 # most recently used first
            for key in shown:
                named.add_metric([tier, key], 1)
            counted.add_metric([tier], len(keys))
            unnamed.add_metric([tier], len(keys) - len(shown))
        yield from (named, counted, unnamed)

    def _named(self, keys: Iterable[str]) -> list[str]:
        shown = []
        for key in keys:
            if len(shown) == MAX_NAMED:
                break
            if not self.is_private(key):
                shown.append(key)
        return shown

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily]:
        return (GaugeMetricFamily("loraplex_adapter_resident", "1 per public adapter resident in a tier "
                                  "(device: a device slot; host: host memory)", labels=["tier", "adapter"]),
                GaugeMetricFamily("loraplex_adapters_resident", "Adapters resident in a tier, private included",
                                  labels=["tier"]),
                GaugeMetricFamily("loraplex_adapters_resident_unnamed", "Resident adapters not named in "
                                  "loraplex_adapter_resident (private, or beyond the label bound)", labels=["tier"]))


def watch_residency(registry: Any, stats: Callable[[], Any], store: Any, is_private: Callable[[str], bool]) -> None:
    """Register the residency gauges for this engine and store (host tier empty without a store)."""
    host = store.host_resident if store is not None and hasattr(store, "host_resident") else (lambda: ())
    registry.register(ResidencyCollector(stats, host, is_private))

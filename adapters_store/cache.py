"""Host-memory LRU cache of loaded adapters, bounded by bytes, with metric hooks."""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

from .types import LoadedAdapter

log = logging.getLogger(__name__)

EventHook = Callable[[str, float], None]
# Events: "hit", "miss", "eviction" (value 1), "load_seconds" (value: seconds), "bytes" (gauge).


@dataclass(frozen=True)
class CacheStats:
    hits: int
    misses: int
    evictions: int
    loads: int
    load_seconds: float
    num_bytes: int
    num_entries: int


class HostCache:
    """LRU by bytes. An adapter larger than the whole budget is not cached."""

    def __init__(self, budget_bytes: int, on_event: EventHook | None = None):
        self.budget_bytes = budget_bytes
        self._on_event = on_event
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, LoadedAdapter] = OrderedDict()
        self._num_bytes = 0
        self._hits = self._misses = self._evictions = self._loads = 0
        self._load_seconds = 0.0

    def set_hook(self, on_event: EventHook | None) -> None:
        self._on_event = on_event

    def get(self, key: str) -> LoadedAdapter | None:
        """The cached adapter (now most recently used), counting a hit or a miss."""
        with self._lock:
            adapter = self._entries.get(key)
            if adapter is None:
                self._misses += 1
            else:
                self._hits += 1
                self._entries.move_to_end(key)
        self._emit("miss" if adapter is None else "hit", 1)
        return adapter

    def keys(self) -> tuple[str, ...]:
        """Keys of the adapters in host memory, least recently used first."""
        with self._lock:
            return tuple(self._entries)

    def contains(self, key: str) -> bool:
        with self._lock:
            return key in self._entries

    def put(self, adapter: LoadedAdapter) -> list[str]:
        """Insert (or refresh) an adapter; returns the keys evicted to make room."""
        if adapter.nbytes > self.budget_bytes:
            return []
        with self._lock:
            old = self._entries.pop(adapter.key, None)
            self._num_bytes -= old.nbytes if old is not None else 0
            evicted = []
            while self._entries and self._num_bytes + adapter.nbytes > self.budget_bytes:
                key, victim = self._entries.popitem(last=False)
                self._num_bytes -= victim.nbytes
                evicted.append(key)
            self._entries[adapter.key] = adapter
            self._num_bytes += adapter.nbytes
            self._evictions += len(evicted)
            num_bytes = self._num_bytes
        for _ in evicted:
            self._emit("eviction", 1)
        self._emit("bytes", num_bytes)
        return evicted

    def pop(self, key: str) -> bool:
        """Drop `key` (not counted as an eviction); True if it was cached."""
        with self._lock:
            adapter = self._entries.pop(key, None)
            if adapter is not None:
                self._num_bytes -= adapter.nbytes
            num_bytes = self._num_bytes
        if adapter is not None:
            self._emit("bytes", num_bytes)
        return adapter is not None

    def record_load(self, seconds: float) -> None:
        with self._lock:
            self._loads += 1
            self._load_seconds += seconds
        self._emit("load_seconds", seconds)

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(self._hits, self._misses, self._evictions, self._loads, self._load_seconds,
                              self._num_bytes, len(self._entries))

    def _emit(self, name: str, value: float) -> None:
        emit_event(self._on_event, name, value)


def emit_event(hook: EventHook | None, name: str, value: float) -> None:
    """Call an adapter tier's event hook, if any; its errors are logged, never raised (a broken
    metrics hook must not break loading an adapter or a step)."""
    if hook is None:
        return
    try:
        hook(name, value)
    except Exception:
        log.exception("adapter event hook failed on %s", name)


def metrics_hook(sink: Any, tier: str = "host") -> EventHook:
    """An EventHook feeding a sink with adapter_cache_hit/miss(tier), adapter_evicted(tier) and
    adapter_loaded(tier, seconds) methods (loraplex.server.metrics.Metrics has them)."""

    def on_event(name: str, value: float) -> None:
        if name == "hit":
            sink.adapter_cache_hit(tier)
        elif name == "miss":
            sink.adapter_cache_miss(tier)
        elif name == "eviction":
            sink.adapter_evicted(tier)
        elif name == "load_seconds":
            sink.adapter_loaded(tier, value)

    return on_event

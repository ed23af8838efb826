"""Which adapter sits in which device slot: lowest-free-first assignment, LRU eviction."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

from ...adapters_store.cache import EventHook, emit_event
from ...adapters_store.types import LoadedAdapter
from .slot_pool import SlotPool


class TooManyAdapters(ValueError):
    """A batch names more distinct adapters than there are device slots."""


@dataclass(frozen=True)
class AdapterManagerStats:
    num_slots: int
    num_loaded: int
    loads: int          # adapters copied into a slot since start
    evictions: int      # adapters removed from a slot (LRU or explicit) since start


class AdapterManager:
    """Maps adapter keys ("name@version") to pool slots.

    `activate` is called once per step with the batch's adapter keys; a key not resident is
    copied into the lowest free slot (so active slots stay dense for the delta kernels), or,
    when none is free, into the least recently used slot whose adapter this batch does not use.
    Thread-safe: `evict` may come from a service thread. `set_event_hook` reports the device
    tier's hits, misses, evictions and load times (the host cache's event names), e.g. to
    Prometheus through adapters_store.cache.metrics_hook(metrics, tier="device").
    """

    def __init__(self, pool: SlotPool):
        self.pool = pool
        self._lock = threading.Lock()
        self._slots: OrderedDict[str, int] = OrderedDict()   # least recently used first
        self._loads = 0
        self._evictions = 0
        self._on_event: EventHook | None = None

    def set_event_hook(self, on_event: EventHook | None) -> None:
        self._on_event = on_event

    @property
    def max_loras(self) -> int:
        return self.pool.max_loras

    @property
    def num_loaded(self) -> int:
        return len(self._slots)

    @property
    def loads(self) -> int:
        return self._loads

    @property
    def evictions(self) -> int:
        return self._evictions

    def resident_keys(self) -> tuple[str, ...]:
        """Keys of the adapters in device slots, least recently used first."""
        with self._lock:
            return tuple(self._slots)

    def slot_of(self, key: str) -> int | None:
        """The key's slot if resident, else None (does not count as a use)."""
        with self._lock:
            return self._slots.get(key)

    def activate(self, keys: set[str] | frozenset[str],
                 get_loaded: Callable[[str], LoadedAdapter]) -> dict[str, int]:
        """Make every key resident; return key -> slot. Raises TooManyAdapters if len(keys) > max_loras."""
        if len(keys) > self.max_loras:
            raise TooManyAdapters(f"the batch uses {len(keys)} adapters but only {self.max_loras} device "
                                  "slots exist; raise --max-loras or schedule fewer adapters per step")
        with self._lock:
            for key in sorted(keys):
                if key in self._slots:
                    self._slots.move_to_end(key)
                    self._emit("hit", 1)
            for key in sorted(k for k in keys if k not in self._slots):
                self._emit("miss", 1)
                slot = self._free_slot(protected=keys)
                started = time.monotonic()
                self.pool.load(slot, get_loaded(key))
                self._slots[key] = slot
                self._loads += 1
                self._emit("load_seconds", time.monotonic() - started)
            return {key: self._slots[key] for key in keys}

    def evict(self, key: str) -> bool:
        """Drop `key` from its slot (e.g. the adapter was deleted); False if it was not resident."""
        with self._lock:
            slot = self._slots.pop(key, None)
            if slot is None:
                return False
            self.pool.clear(slot)
            self._evictions += 1
            self._emit("eviction", 1)
            return True

    def stats(self) -> AdapterManagerStats:
        with self._lock:
            return AdapterManagerStats(self.max_loras, len(self._slots), self._loads, self._evictions)

    def _emit(self, name: str, value: float) -> None:
        emit_event(self._on_event, name, value)

    def _free_slot(self, protected: set[str] | frozenset[str]) -> int:
        """Lowest free slot, else the LRU slot whose adapter is not in `protected` (cleared)."""
        used = set(self._slots.values())
        for slot in range(self.max_loras):
            if slot not in used:
                return slot
        for victim, slot in self._slots.items():
            if victim not in protected:
                del self._slots[victim]
                self.pool.clear(slot)
                self._evictions += 1
                self._emit("eviction", 1)
                return slot
        raise TooManyAdapters(f"all {self.max_loras} slots hold adapters of the current batch")

"""Per-key leases: the engine holds one per running request; deletion waits for them to end."""

from __future__ import annotations

import threading
from typing import Callable

from .errors import AdapterNotFound


class LeaseTable:
    """Counts leases per key (this process only); runs idle callbacks when a count reaches 0."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}
        self._deleting: set[str] = set()
        self._on_idle: dict[str, list[Callable[[], None]]] = {}

    def acquire(self, key: str) -> None:
        """Take a lease; AdapterNotFound if the key is being deleted."""
        with self._lock:
            if key in self._deleting:
                raise AdapterNotFound(f"adapter {key} is being deleted; use another adapter or version")
            self._counts[key] = self._counts.get(key, 0) + 1

    def release(self, key: str) -> None:
        """Return a lease taken with acquire(key)."""
        with self._lock:
            count = self._counts.get(key, 0)
            if count == 0:
                raise ValueError(f"release({key!r}) without a matching acquire")
            if count > 1:
                self._counts[key] = count - 1
                return
            del self._counts[key]
            callbacks = self._on_idle.pop(key, [])
        for callback in callbacks:
            callback()

    def count(self, key: str) -> int:
        with self._lock:
            return self._counts.get(key, 0)

    def mark_deleting(self, keys: list[str]) -> None:
        """From now on acquire(key) fails for these keys."""
        with self._lock:
            self._deleting.update(keys)

    def when_idle(self, key: str, callback: Callable[[], None]) -> None:
        """Run `callback` once no lease on `key` is held (now, or in the thread of the last release)."""
        with self._lock:
            if self._counts.get(key, 0) > 0:
                self._on_idle.setdefault(key, []).append(callback)
                return
        callback()

    def forget(self, key: str) -> None:
        with self._lock:
            self._deleting.discard(key)

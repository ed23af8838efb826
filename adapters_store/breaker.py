"""Fail fast while a shared backend is known to be down (a circuit breaker).

Without it every call during an outage waits the backend's full timeout (a pool wait of
`--backend-timeout`, 10 s by default) before it fails: each request for an adapter the server
still holds in memory stalled that long before the store fell back to its remembered record.
After a failed call the breaker is open: calls fail at once for `retry_after_s`; then one call
is let through as a probe (`admit()` returns True: the caller waits only briefly) while the
others keep failing fast, and the probe's outcome closes the breaker or opens it again.
"""

from __future__ import annotations

import threading
import time
from typing import Callable


class BackendDown(Exception):
    """Raised by `Breaker.admit` while the breaker is open."""

    def __init__(self, down_s: float, retry_in_s: float):
        super().__init__(f"failing for {down_s:.1f} s; not tried again for {max(retry_in_s, 0.0):.1f} s")


class Breaker:
    """Thread-safe. admit() before a call, then succeeded() or failed() after it."""

    def __init__(self, retry_after_s: float = 1.0, clock: Callable[[], float] = time.monotonic):
        self._retry_after_s = retry_after_s
        self._clock = clock
        self._lock = threading.Lock()
        self._down_since: float | None = None      # None: closed (the backend answered last time)
        self._next_probe_at = 0.0

    def admit(self) -> bool:
        """Let a call through: True when it is the probe of a backend that failed recently
        (use a short timeout), False when the backend answered last time. BackendDown while the
        breaker is open and no probe is due."""
        now = self._clock()
        with self._lock:
            if self._down_since is None:
                return False
            if now < self._next_probe_at:
                raise BackendDown(now - self._down_since, self._next_probe_at - now)
            self._next_probe_at = now + self._retry_after_s     # one probe at a time
            return True

    def succeeded(self) -> None:
        with self._lock:
            self._down_since = None

    def failed(self) -> None:
        now = self._clock()
        with self._lock:
            if self._down_since is None:
                self._down_since = now
            self._next_probe_at = now + self._retry_after_s

    @property
    def is_open(self) -> bool:
        with self._lock:
            return self._down_since is not None

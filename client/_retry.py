"""Retry policy: exponential backoff with jitter for UNAVAILABLE and RESOURCE_EXHAUSTED.

A server's RetryInfo delay, when present, replaces the computed backoff (the server knows best
when its queue drains). Retries never outlive the call's deadline: when the next wait would end
after it, the last error is raised instead.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

import grpc

from .errors import LoraplexError, OverloadedError

RETRYABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})


@dataclass(frozen=True)
class RetryPolicy:
    """How calls are retried. `max_attempts=1` turns retries off.

    The wait before retry n (n = 1, 2, ...) is `min(max_backoff_s, initial_backoff_s *
    multiplier**(n-1))`, scaled by a random factor in [1 - jitter, 1], unless the server sent a
    RetryInfo delay, which is used as is (capped at `max_retry_after_s`).
    """

    max_attempts: int = 4
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 5.0
    multiplier: float = 2.0
    jitter: float = 0.5
    max_retry_after_s: float = 30.0
    retry_codes: frozenset[grpc.StatusCode] = field(default=RETRYABLE_CODES)

    def __post_init__(self):
        if self.max_attempts < 1:
            raise ValueError("RetryPolicy.max_attempts must be >= 1 (1 = no retries)")
        if self.initial_backoff_s < 0 or self.max_backoff_s < 0 or self.multiplier < 1:
            raise ValueError("RetryPolicy backoffs must be >= 0 and multiplier >= 1")
        if not 0 <= self.jitter <= 1:
            raise ValueError("RetryPolicy.jitter must be in [0, 1]")

    def backoff_s(self, retry_number: int, rng: random.Random) -> float:
        """The jittered exponential backoff before retry `retry_number` (1-based)."""
        ceiling = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** (retry_number - 1))
        return ceiling * (1.0 - self.jitter * rng.random())

    def delay_s(self, error: LoraplexError, retry_number: int, rng: random.Random) -> float | None:
        """Seconds to wait before retrying after `error`, or None when it must not be retried."""
        if error.code not in self.retry_codes or retry_number >= self.max_attempts:
            return None
        if isinstance(error, OverloadedError) and error.retry_after is not None:
            return min(error.retry_after, self.max_retry_after_s)
        return self.backoff_s(retry_number, rng)


NO_RETRY = RetryPolicy(max_attempts=1)


class Attempts:
    """Book-keeping of one logical call: its deadline and how many attempts were made."""

    def __init__(self, policy: RetryPolicy, timeout_s: float | None, rng: random.Random):
        self.policy = policy
        self.rng = rng
        self.deadline = None if timeout_s is None else time.monotonic() + timeout_s
        self.made = 0

    def remaining_s(self) -> float | None:
        """Seconds left before the deadline (the next attempt's gRPC timeout); None = no deadline."""
        if self.deadline is None:
            return None
        return max(0.0, self.deadline - time.monotonic())

    def next_delay_s(self, error: LoraplexError) -> float | None:
        """The wait before the next attempt, or None to give up and raise `error`."""
        delay = self.policy.delay_s(error, self.made, self.rng)
        if delay is None:
            return None
        remaining = self.remaining_s()
        if remaining is not None and delay >= remaining:
            return None
        return delay

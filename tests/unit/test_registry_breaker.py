"""The shared registry's circuit breaker: alone on a hand-driven clock, then on a real
PostgreSQL stopped and started under a PostgresRegistry."""

from __future__ import annotations

import time

import pytest

from loraplex.adapters_store.breaker import BackendDown, Breaker
from loraplex.adapters_store.errors import StoreUnavailable


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_breaker_fails_fast_after_a_failure_and_lets_one_probe_through_per_interval():
    clock = Clock()
    breaker = Breaker(retry_after_s=1.0, clock=clock)
    assert breaker.admit() is False                           # closed: calls go through normally
    breaker.failed()
    with pytest.raises(BackendDown, match=r"failing for 0\.0 s; not tried again for 1\.0 s"):
        breaker.admit()
    clock.now += 1.5
    assert breaker.admit() is True                            # the due probe ...
    with pytest.raises(BackendDown, match=r"failing for 1\.5 s"):
        breaker.admit()                                       # ... and no second one while it runs
    breaker.failed()                                          # the probe failed: open again
    clock.now += 0.5
    with pytest.raises(BackendDown):
        breaker.admit()
    clock.now += 0.6
    assert breaker.admit() is True
    breaker.succeeded()                                       # the probe reached the backend
    assert not breaker.is_open and breaker.admit() is False


def test_registry_outage_fails_fast_once_known_and_recovers(postgres_service):
    from loraplex.adapters_store.registry_pg import PostgresRegistry

    clock = Clock()
    registry = PostgresRegistry(postgres_service.new_database(), timeout_s=2,
                                breaker=Breaker(retry_after_s=1.0, clock=clock))
    try:
        assert registry.versions_of("x") == []
        postgres_service.stop()
        try:
            with pytest.raises(StoreUnavailable, match="unreachable") as first:
                registry.versions_of("x")                     # tries PostgreSQL (waits <= 2 s)
            assert "not tried again" not in str(first.value)
            started = time.monotonic()
            with pytest.raises(StoreUnavailable, match="not tried again for 1.0 s"):
                registry.versions_of("x")                     # known down: no wait at all
            assert time.monotonic() - started < 1.0           # generous: it does no I/O
            clock.now += 1.5
            with pytest.raises(StoreUnavailable) as probe:
                registry.versions_of("x")                     # the probe: still down
            assert "not tried again" not in str(probe.value)
        finally:
            postgres_service.start()
        deadline = time.monotonic() + 60                      # the pool reconnects in the background
        while True:
            clock.now += 1.5
            try:
                assert registry.versions_of("x") == []
                break
            except StoreUnavailable:
                assert time.monotonic() < deadline, "the registry did not recover"
                time.sleep(0.2)
    finally:
        registry.close()


def test_an_error_postgresql_sends_does_not_open_the_breaker(postgres_service):
    """A cancelled statement is StoreUnavailable for its caller, but PostgreSQL answered: other
    calls go on without a pause."""
    from loraplex.adapters_store.registry_pg import PostgresRegistry

    registry = PostgresRegistry(postgres_service.new_database(), timeout_s=2)
    try:
        with pytest.raises(StoreUnavailable, match="statement timeout"):
            with registry._connect() as conn:
                conn.execute("SET LOCAL statement_timeout = 10")
                conn.execute("SELECT pg_sleep(5)")
        assert not registry._breaker.is_open
        assert registry.versions_of("x") == []
    finally:
        registry.close()

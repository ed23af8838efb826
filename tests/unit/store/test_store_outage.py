"""PostgreSQL or S3 stopped and restarted under a live store: cached adapters keep serving, cold
ones fail with StoreUnavailable (never quarantined, nothing lost), and the store recovers."""

from __future__ import annotations

import time

import pytest

from loraplex.adapters_store.errors import StoreUnavailable
from loraplex.adapters_store.records import AdapterState
from store_adapters import adapter_bytes, make_store, upload


def _eventually(call, timeout_s: float = 60):
    """call() once the backend answers again: right after a restart the registry's breaker
    (one probe per second) and the pool's reconnection may still refuse for a moment."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return call()
        except StoreUnavailable:
            assert time.monotonic() < deadline, "the store did not recover"
            time.sleep(0.2)


@pytest.fixture
def shared_store(tmp_path, store_backend, postgres_service, s3_service):
    if store_backend != "shared":
        pytest.skip("outages concern the shared backends (PostgreSQL, S3)")
    store = make_store(tmp_path / "store", backend_timeout_s=2)
    yield store
    store.close()


def test_postgres_restart_cached_adapters_keep_resolving_and_the_store_recovers(shared_store, postgres_service):
    store = shared_store
    hot = upload(store, "hot", *adapter_bytes(seed=1))
    cold = upload(store, "cold", *adapter_bytes(seed=2))
    assert store.load(store.resolve("hot", None).key).key == hot.key
    postgres_service.stop()
    try:
        assert store.resolve("hot", None).key == hot.key             # remembered + in host memory
        assert store.load(hot.key).key == hot.key
        with pytest.raises(StoreUnavailable, match="unreachable"):
            store.resolve("cold", None)
        with pytest.raises(StoreUnavailable):
            upload(store, "new", *adapter_bytes(seed=3))
    finally:
        postgres_service.start()
    assert _eventually(lambda: store.resolve("cold", None)).key == cold.key   # pool reconnects, breaker closes
    assert store.load(cold.key).key == cold.key
    assert upload(store, "new", *adapter_bytes(seed=3)).version == 1
    assert all(r.state is AdapterState.READY for r in store._registry.all())


def test_s3_restart_cold_loads_fail_unavailable_without_quarantine(shared_store, s3_service):
    store = shared_store
    hot = upload(store, "hot", *adapter_bytes(seed=1))
    cold = upload(store, "cold", *adapter_bytes(seed=2))
    store.load(hot.key)
    store._blobs.cache.drop(cold.sha256)                             # not on this server's disk either
    s3_service.stop()
    try:
        assert store.load(hot.key).key == hot.key
        with pytest.raises(StoreUnavailable, match="unreachable"):
            store.prefetch(cold.key).result(timeout=60)
    finally:
        s3_service.start()
    assert store._registry.get("cold", 1).state is AdapterState.READY   # not quarantined
    assert store.load(cold.key).key == cold.key

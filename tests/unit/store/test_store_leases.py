"""Leases and delete: running requests finish first, then the adapter leaves every tier and disk."""

from __future__ import annotations

import threading
import time

import pytest

from loraplex.adapters_store.errors import AdapterNotFound
from loraplex.adapters_store.leases import LeaseTable
from loraplex.adapters_store.records import AdapterState
from store_adapters import adapter_bytes, blob_digests, make_store, snapshot, upload


@pytest.fixture
def store(tmp_path):
    store = make_store(tmp_path / "store")
    yield store
    store.close()


def test_lease_table_counts_and_runs_idle_callbacks_once():
    leases, calls = LeaseTable(), []
    leases.acquire("a@1")
    leases.acquire("a@1")
    leases.when_idle("a@1", lambda: calls.append("idle"))
    leases.release("a@1")
    assert calls == [] and leases.count("a@1") == 1
    leases.release("a@1")
    assert calls == ["idle"] and leases.count("a@1") == 0
    leases.when_idle("a@1", lambda: calls.append("now"))
    assert calls == ["idle", "now"]
    with pytest.raises(ValueError, match="without a matching acquire"):
        leases.release("a@1")
    leases.mark_deleting(["a@1"])
    with pytest.raises(AdapterNotFound, match="being deleted"):
        leases.acquire("a@1")


def test_delete_waits_for_leases_then_removes_rows_blobs_and_cache(store):
    record = upload(store, "ad", *adapter_bytes(seed=1))
    keep = upload(store, "other", *adapter_bytes(seed=2))
    store.acquire(record.key)
    store.load(record.key)
    deleted = []
    deleter = threading.Thread(target=lambda: deleted.append(store.delete("ad", None)), daemon=True)
    deleter.start()
    time.sleep(0.2)
    assert deleter.is_alive()                                  # a request still holds the lease
    with pytest.raises(AdapterNotFound):
        store.resolve("ad", None)                              # new requests see NOT_FOUND at once
    with pytest.raises(AdapterNotFound):
        store.acquire(record.key)
    assert store.load(record.key).key == record.key            # the running request may still load it
    assert record.sha256 in blob_digests(store) and store._registry.get("ad", 1).state is AdapterState.DELETING
    store.release(record.key)
    deleter.join(timeout=10)
    assert deleted == [[1]]
    assert record.sha256 not in blob_digests(store) and store._registry.get("ad", 1) is None and not store.is_loaded(record.key)
    with pytest.raises(AdapterNotFound):
        store.load(record.key)
    assert store.load(keep.key).key == keep.key


def test_delete_without_wait_finishes_on_last_release(store):
    record = upload(store, "ad", *adapter_bytes(seed=1))
    store.acquire(record.key)
    assert store.delete("ad@1", None, wait=False) == [1]
    assert store._registry.get("ad", 1) is not None
    store.release(record.key)
    deadline = time.monotonic() + 10
    while snapshot(store) != (frozenset(), (("ad", None, 1),)) and time.monotonic() < deadline:
        time.sleep(0.01)                                       # rows go first, then blobs
    assert snapshot(store) == (frozenset(), (("ad", None, 1),))


def test_shared_blob_survives_deleting_one_of_two_versions(store):
    config_bytes, weights_bytes = adapter_bytes(seed=4)
    upload(store, "ad", config_bytes, weights_bytes)
    second = upload(store, "ad", config_bytes, weights_bytes)
    assert store.delete("ad@1", None) == [1]
    assert store.load(second.key).key == "ad@2"
    assert store.delete("ad", None) == [2]
    with pytest.raises(AdapterNotFound):
        store.delete("ad", None)
    assert snapshot(store)[0] == frozenset()


def test_prefetch_of_a_deleted_adapter_fails_with_not_found(store):
    record = upload(store, "ad", *adapter_bytes())
    store.delete("ad", None)
    with pytest.raises(AdapterNotFound):
        store.prefetch(record.key).result(timeout=10)

"""Versions, tenancy, loading (with sha256 verification) and upload session rules."""

from __future__ import annotations

import threading

import pytest
import torch

from loraplex.adapters_store.errors import (AdapterNotFound, AdapterValidationError, IntegrityError,
                                            PermissionDenied, QuotaExceeded, UploadConflict)
from loraplex.adapters_store.paths import CONFIG_NAME, WEIGHTS_NAME
from loraplex.adapters_store.records import AdapterState
from loraplex.adapters_store.upload import UploadMeta
from store_adapters import (adapter_bytes, adapter_tensors, corrupt_blob, make_store, sha256, snapshot, staging_leftovers,
                            tensor_key, upload, write_adapter)


@pytest.fixture
def store(tmp_path):
    store = make_store(tmp_path / "store")
    yield store
    store.close()


def test_name_resolves_to_latest_ready_and_pins_versions(store):
    for seed in range(3):
        upload(store, "ad", *adapter_bytes(seed=seed))
    assert store.resolve("ad", None).version == 3
    assert store.resolve("ad@2", None).version == 2
    store.quarantine("ad@3", "test")
    assert store.resolve("ad", None).version == 2
    assert store.resolve("ad@3", None).state is AdapterState.QUARANTINED
    record, versions = store.get("ad", None)
    assert record.version == 2 and versions == [1, 2, 3]
    with pytest.raises(AdapterNotFound):
        store.resolve("ad@9", None)
    with pytest.raises(AdapterNotFound):
        store.resolve("nope", None)


def test_versions_are_never_reused_after_delete(store):
    upload(store, "ad", *adapter_bytes(seed=0))
    upload(store, "ad", *adapter_bytes(seed=1))
    assert store.delete("ad", None) == [1, 2]
    assert upload(store, "ad", *adapter_bytes(seed=2)).version == 3


def test_private_adapters_are_invisible_to_other_tenants(store):
    upload(store, "mine", *adapter_bytes(seed=0), owner="acme")
    upload(store, "shared", *adapter_bytes(seed=1))
    assert store.resolve("mine", "acme").private
    for tenant in ("globex", None):
        with pytest.raises(AdapterNotFound):
            store.resolve("mine", tenant)
        with pytest.raises(AdapterNotFound):
            store.get("mine@1", tenant)
        with pytest.raises(AdapterNotFound):
            store.delete("mine", tenant)
        assert [r.name for r in store.list(tenant)] == ["shared"]
    assert [r.name for r in store.list("acme")] == ["mine", "shared"]
    with pytest.raises(UploadConflict, match="is taken") as private_taken:
        upload(store, "mine", *adapter_bytes(seed=2), owner="globex")
    assert upload(store, "mine", *adapter_bytes(seed=2), owner="acme").version == 2
    with pytest.raises(UploadConflict, match="is taken") as public_taken:
        upload(store, "shared", *adapter_bytes(seed=2), owner="globex")
    # one message for every taken id: it does not tell a private id from a public one, nor whose it is
    assert str(private_taken.value).replace("mine", "X") == str(public_taken.value).replace("shared", "X")


def test_public_ids_take_new_versions_and_deletes_from_operators_only(store, tmp_path):
    """Tenant rule (issue 16, item 8): a tenant admin may publish a new public id, but only a caller
    without a tenant may push a new version of an existing public id or delete it."""
    record = upload_as(store, "catalog", tenant="acme")
    assert record.owner is None and record.version == 1
    for tenant in ("acme", "globex"):
        with pytest.raises(PermissionDenied, match="without a tenant"):
            upload_as(store, "catalog", tenant=tenant)
        write_adapter(tmp_path / "adapters" / "ok")
        with pytest.raises(PermissionDenied, match="without a tenant"):
            store.register_path("catalog", tmp_path / "adapters" / "ok", tenant=tenant)
        with pytest.raises(PermissionDenied, match="without a tenant"):
            store.delete("catalog", tenant)
    assert [r.version for r in store.list("globex")] == [1]
    assert upload_as(store, "catalog", tenant=None).version == 2
    assert store.delete("catalog", None) == [1, 2]


def test_tenant_rule_is_checked_again_at_commit(store):
    """Issue 31 (8): the rule was checked when an upload started; a slow tenant upload of a new
    public id committed as v2 of the id an operator created meanwhile."""
    config_bytes, weights_bytes = adapter_bytes(seed=7)
    meta = UploadMeta(name="race", config_size=len(config_bytes), config_sha256=sha256(config_bytes),
                      weights_size=len(weights_bytes), weights_sha256=sha256(weights_bytes), tenant="acme")
    with store.begin_upload(meta) as session:            # a new public id: allowed when it starts
        session.write(CONFIG_NAME, config_bytes)
        session.write(WEIGHTS_NAME, weights_bytes)
        assert upload_as(store, "race", tenant=None).version == 1       # the operator, meanwhile
        with pytest.raises(PermissionDenied, match="without a tenant"):
            session.commit()
    record, versions = store.get("race", None)
    assert versions == [1] and record.owner is None


def upload_as(store, name: str, tenant: str | None):
    config_bytes, weights_bytes = adapter_bytes(seed=7)
    meta = UploadMeta(name=name, config_size=len(config_bytes), config_sha256=sha256(config_bytes),
                      weights_size=len(weights_bytes), weights_sha256=sha256(weights_bytes), tenant=tenant)
    with store.begin_upload(meta) as session:
        session.write(CONFIG_NAME, config_bytes)
        session.write(WEIGHTS_NAME, weights_bytes)
        return session.commit()


def test_load_parses_weights_and_uses_the_host_cache(store):
    tensors = adapter_tensors(rank=4, targets=("q_proj", "down_proj"), seed=3, dtype=torch.bfloat16)
    config_bytes, weights_bytes = adapter_bytes(tensors=tensors, targets=("q_proj", "down_proj"))
    record = upload(store, "bf", config_bytes, weights_bytes)
    assert record.dtype == "bfloat16" and record.config.target_modules == ("q_proj", "down_proj")
    assert not store.is_loaded(record.key)
    adapter = store.prefetch(record.key).result(timeout=10)
    assert store.is_loaded(record.key) and store.load(record.key) is adapter
    a, b = adapter.weights[(1, "down_proj")]
    assert a.shape == (4, 128) and b.shape == (64, 4) and a.dtype == torch.float32
    assert torch.equal(a, tensors[tensor_key(1, "down_proj", "A")].float())
    assert adapter.config.scaling == 2.0 and sorted(adapter.weights) == [(0, "down_proj"), (0, "q_proj"),
                                                                          (1, "down_proj"), (1, "q_proj")]
    stats = store.cache.stats()
    assert stats.loads == 1 and stats.hits >= 1


def test_corrupted_blob_raises_integrity_error_and_quarantines(store):
    record = upload(store, "ad", *adapter_bytes())
    data = bytearray(store._blobs.read(record.sha256))
    data[-5] ^= 0xFF
    corrupt_blob(store, record.sha256, bytes(data))
    with pytest.raises(IntegrityError, match="corrupted"):
        store.prefetch(record.key).result(timeout=10)
    assert store.resolve("ad@1", None).state is AdapterState.QUARANTINED
    with pytest.raises(IntegrityError, match="quarantined"):
        store.load(record.key)
    assert store.delete("ad", None) == [1] and snapshot(store)[0] == frozenset()


def test_oversize_chunk_is_refused_at_once_and_leaves_nothing(store):
    config_bytes, weights_bytes = adapter_bytes()
    meta = UploadMeta("ad", len(config_bytes), sha256(config_bytes), len(weights_bytes) - 10, sha256(weights_bytes))
    session = store.begin_upload(meta)
    session.write(CONFIG_NAME, config_bytes)
    with pytest.raises(AdapterValidationError) as caught:
        session.write(WEIGHTS_NAME, weights_bytes)
    assert caught.value.rule == "oversize" and staging_leftovers(store.root) == []
    with pytest.raises(UploadConflict, match="already"):
        session.write(WEIGHTS_NAME, b"x")


@pytest.mark.parametrize("rule", ["truncated", "chunk_size", "unknown_file", "abort"])
def test_failed_or_aborted_uploads_leave_nothing(store, rule):
    config_bytes, weights_bytes = adapter_bytes()
    before = snapshot(store)
    session = store.begin_upload(UploadMeta("ad", len(config_bytes), sha256(config_bytes), len(weights_bytes),
                                            sha256(weights_bytes)))
    session.write(CONFIG_NAME, config_bytes)
    with pytest.raises(AdapterValidationError) as caught:
        if rule == "truncated":
            session.write(WEIGHTS_NAME, weights_bytes[:-1])
            session.commit()
        elif rule == "chunk_size":
            session.write(WEIGHTS_NAME, b"\0" * (2**20 + 1))
        elif rule == "unknown_file":
            session.write("adapter_model.bin", b"x")
        else:
            session.abort()
            raise AdapterValidationError("abort", "aborted")
    assert caught.value.rule == rule
    assert snapshot(store) == before and staging_leftovers(store.root) == []


def test_quota_is_store_wide(tmp_path):
    config_bytes, weights_bytes = adapter_bytes()
    size = len(config_bytes) + len(weights_bytes)
    store = make_store(tmp_path / "store", quota_bytes=2 * size + 10)
    upload(store, "a", config_bytes, weights_bytes)
    upload(store, "b", config_bytes, weights_bytes)
    with pytest.raises(QuotaExceeded, match="quota"):
        upload(store, "c", config_bytes, weights_bytes)
    store.delete("a", None)
    assert upload(store, "c", config_bytes, weights_bytes).version == 1
    assert store.used_bytes() == 2 * size
    store.close()


def test_concurrent_uploads_of_one_id_get_distinct_versions_in_commit_order(store):
    payloads = [adapter_bytes(seed=seed) for seed in range(6)]
    records = []
    barrier = threading.Barrier(len(payloads))

    def run(payload):
        barrier.wait()
        records.append(upload(store, "same", *payload, chunk_bytes=1024))

    threads = [threading.Thread(target=run, args=(p,)) for p in payloads]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(r.version for r in records) == list(range(1, 7))
    by_commit_time = sorted(records, key=lambda r: r.created_at)
    assert [r.version for r in by_commit_time] == list(range(1, 7))
    assert {r.sha256 for r in records} == {sha256(w) for _, w in payloads}

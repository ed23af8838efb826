"""Backends by URL: schema versions and migrations, unreachable backends, s3:// adapter sources."""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest

from loraplex.adapters_store.errors import AdapterValidationError, PermissionDenied, SchemaError, StoreUnavailable
from loraplex.adapters_store.records import AdapterState
from loraplex.adapters_store.schema import CURRENT_VERSION, MIGRATIONS
from store_adapters import adapter_bytes, make_store, sha256, snapshot, upload

FIXTURE_V1 = Path(__file__).with_name("fixtures") / "store_v1"


def test_a_store_written_by_the_first_release_opens_and_upgrades(tmp_path, store_backend):
    root = tmp_path / "store"
    if store_backend == "local":
        shutil.copytree(FIXTURE_V1, root)                    # registry.sqlite3 + blobs of schema version 1
    else:
        import psycopg

        with psycopg.connect(os.environ["LORAPLEX_TEST_STORE_REGISTRY"], autocommit=True) as conn:
            for statement in filter(None, (s.strip() for s in MIGRATIONS[0].postgres.split(";"))):
                conn.execute(statement)                      # an empty registry of schema version 1
    store = make_store(root)
    try:
        assert store._registry.schema_version() == CURRENT_VERSION
        assert store._registry.migrations_applied == [m.version for m in MIGRATIONS[1:]]
        if store_backend == "local":
            assert [r.key for r in store.list(None)] == ["legacy@2"]
            assert store.resolve("private-one", "acme").version == 1
            for key in ("legacy@2", "private-one@1"):
                assert store.load(key).key == key            # old blobs verify and parse
            assert store.recovery.clean
        record = upload(store, "legacy", *adapter_bytes(seed=11))
        assert record.version == (3 if store_backend == "local" else 1)   # versions never reused
        assert store._registry.get("legacy", record.version).state_changed_at > 0
    finally:
        store.close()
    reopened = make_store(root)                              # already current: nothing to apply
    assert reopened._registry.migrations_applied == []
    reopened.close()


def test_a_newer_schema_is_refused_with_a_clear_message(tmp_path):
    store = make_store(tmp_path / "store")
    with store._registry._write() as conn:
        conn.execute("UPDATE schema_version SET version = ?", (CURRENT_VERSION + 1,))
    store.close()
    with pytest.raises(SchemaError, match=f"schema version {CURRENT_VERSION + 1}, newer than this loraplex"):
        make_store(tmp_path / "store")


def test_unreachable_registry_names_the_url_without_its_password(tmp_path):
    with pytest.raises(StoreUnavailable) as error:
        make_store(tmp_path / "store", registry_url="postgresql://loraplex:hunter2-secret@127.0.0.1:1/adapters",
                   backend_timeout_s=2)
    assert "postgresql://loraplex:***@127.0.0.1:1/adapters" in str(error.value)
    assert "hunter2" not in str(error.value)


def test_unreachable_or_missing_bucket_is_a_clear_error(tmp_path, s3_service):
    with pytest.raises(StoreUnavailable, match="does not exist"):
        make_store(tmp_path / "store", blobs_url="s3://no-such-bucket/x")


# ---- s3:// adapter sources ---------------------------------------------------------------------
def _put_adapter(s3, prefix: str, files: dict[str, bytes]) -> str:
    client = s3.client()
    for name, data in files.items():
        client.put_object(Bucket=s3.bucket, Key=f"{prefix}/{name}", Body=data)
    return f"s3://{s3.bucket}/{prefix}/"


@pytest.fixture
def sourced(tmp_path, s3_service):
    prefix = s3_service.new_prefix().split("/", 3)[3]
    store = make_store(tmp_path / "store", adapter_sources=(f"s3://{s3_service.bucket}/{prefix}/allowed",))
    yield store, prefix
    store.close()


def test_adapter_registered_from_an_allowed_s3_prefix_is_copied_and_served(sourced, s3_service):
    store, prefix = sourced
    config_bytes, weights_bytes = adapter_bytes(seed=5)
    url = _put_adapter(s3_service, f"{prefix}/allowed/team/a1", {"adapter_config.json": config_bytes,
                                                                 "adapter_model.safetensors": weights_bytes})
    record = store.register_path("from-s3", url)
    assert record.key == "from-s3@1" and record.state is AdapterState.READY
    client = s3_service.client()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        client.delete_object(Bucket=s3_service.bucket, Key=f"{prefix}/allowed/team/a1/{name}")
    store.cache.pop(record.key)
    assert store.load(record.key).config.rank == 4               # the source may disappear: it was copied


@pytest.mark.parametrize("where", ["outside", "traversal", "other_bucket", "dot_segment", "prefix_lookalike"])
def test_s3_sources_outside_the_allowed_prefixes_are_refused(sourced, s3_service, where):
    store, prefix = sourced
    files = dict(zip(("adapter_config.json", "adapter_model.safetensors"), adapter_bytes(seed=6)))
    _put_adapter(s3_service, f"{prefix}/secret/a1", files)
    _put_adapter(s3_service, f"{prefix}/allowed-not/a1", files)
    url = {"outside": f"s3://{s3_service.bucket}/{prefix}/secret/a1/",
           "traversal": f"s3://{s3_service.bucket}/{prefix}/allowed/../secret/a1/",
           "other_bucket": f"s3://other-bucket/{prefix}/allowed/a1/",
           "dot_segment": f"s3://{s3_service.bucket}/{prefix}/allowed/./a1/",
           "prefix_lookalike": f"s3://{s3_service.bucket}/{prefix}/allowed-not/a1/"}[where]
    before = snapshot(store)
    with pytest.raises(PermissionDenied):
        store.register_path("evil", url)
    assert snapshot(store) == before


def _malicious_files() -> dict[str, dict[str, bytes]]:
    config_bytes, weights_bytes = adapter_bytes(seed=7)
    huge_header = struct.pack("<Q", 2**40) + b"{}"
    overlapping = json.dumps({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight":
                              {"dtype": "F32", "shape": [4, 64], "data_offsets": [0, 10**9]}}).encode()
    return {"pickle_only": {"adapter_config.json": config_bytes, "adapter_model.bin": b"\x80\x04cos\nsystem\n."},
            "huge_header": {"adapter_config.json": config_bytes, "adapter_model.safetensors": huge_header},
            "bad_offsets": {"adapter_config.json": config_bytes,
                            "adapter_model.safetensors": struct.pack("<Q", len(overlapping)) + overlapping},
            "config_not_json": {"adapter_config.json": b"\x00not json", "adapter_model.safetensors": weights_bytes}}


@pytest.mark.parametrize("case", sorted(_malicious_files()))
def test_malicious_files_in_an_allowed_prefix_are_refused_and_nothing_is_stored(sourced, s3_service, case):
    store, prefix = sourced
    url = _put_adapter(s3_service, f"{prefix}/allowed/{case}", _malicious_files()[case])
    before = snapshot(store)
    with pytest.raises(AdapterValidationError):
        store.register_path("bad", url)
    assert snapshot(store) == before


def test_s3_sources_are_off_without_adapter_source(tmp_path, s3_service):
    store = make_store(tmp_path / "store")
    with pytest.raises(PermissionDenied, match="--adapter-source"):
        store.register_path("x", f"s3://{s3_service.bucket}/anything/")
    store.close()


def test_store_gc_command_removes_orphans_and_keeps_referenced_blobs(tmp_path, capsys):
    from loraplex.cli import main

    root = tmp_path / "store"
    store = make_store(root)
    kept = upload(store, "kept", *adapter_bytes(seed=1))
    orphan = root / "orphan"
    orphan.write_bytes(b"orphan blob")
    orphan_digest = sha256(b"orphan blob")
    store._blobs.put(orphan, orphan_digest)                   # a writer killed between blob and row
    store.close()
    argv = ["store", "gc", "--store", str(root), "--stale-delete-after", "0"]
    for flag, env in (("--store-registry", "LORAPLEX_TEST_STORE_REGISTRY"), ("--store-blobs", "LORAPLEX_TEST_STORE_BLOBS")):
        argv += [flag, os.environ[env]] if os.environ.get(env) else []
    assert main(argv) == 0
    assert "1 orphan blobs removed" in capsys.readouterr().out
    reopened = make_store(root)
    assert orphan_digest not in reopened._blobs.list_digests()
    assert reopened.load(kept.key).key == kept.key
    reopened.close()

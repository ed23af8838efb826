"""Parallel uploads, reads and deletes from threads and a second process end in the serial model's state."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from loraplex.adapters_store.errors import AdapterNotFound
from loraplex.adapters_store.records import AdapterState
from loraplex.adapters_store.staging import StagingDir
from loraplex.adapters_store.store import AdapterStore
from store_adapters import adapter_bytes, blob_digests, make_store, sha256, upload, verify_blobs

WORKER = Path(__file__).with_name("store_worker.py")
NAMES = ("shared", "alpha", "beta")


def _writer(store: AdapterStore, worker: int, uploads: list, deletes: list, errors: list) -> None:
    rng = random.Random(worker)
    try:
        for step in range(8):
            name = NAMES[rng.randrange(len(NAMES))]
            payload = adapter_bytes(seed=worker * 100 + step)
            record = upload(store, name, *payload, chunk_bytes=1024)
            uploads.append((record.key, sha256(payload[1])))
            if step % 3 == 2:
                try:
                    deletes.extend(f"{name}@{v}" for v in store.delete(f"{name}@{record.version}", None))
                except AdapterNotFound:
                    pass
    except Exception as error:  # noqa: BLE001 - reported by the test
        errors.append(error)


def _reader(store: AdapterStore, stop: threading.Event, errors: list) -> None:
    try:
        while not stop.is_set():
            for name in NAMES:
                try:
                    record = store.resolve(name, None)
                    store.acquire(record.key)
                except AdapterNotFound:
                    continue
                try:
                    assert store.load(record.key).key == record.key
                finally:
                    store.release(record.key)
    except Exception as error:  # noqa: BLE001
        errors.append(error)


@pytest.mark.timeout(120)
def test_parallel_uploads_reads_deletes_match_the_serial_model(tmp_path):
    root = tmp_path / "store"
    store = make_store(root)
    env = {**os.environ, "PYTHONPATH": str(WORKER.parent)}
    other = subprocess.Popen([sys.executable, str(WORKER), str(root), "upload-n", "10", "shared", "gamma"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    uploads, deletes, errors, stop = [], [], [], threading.Event()
    writers = [threading.Thread(target=_writer, args=(store, n, uploads, deletes, errors)) for n in range(4)]
    readers = [threading.Thread(target=_reader, args=(store, stop, errors), daemon=True) for _ in range(2)]
    for thread in writers + readers:
        thread.start()
    try:
        out, err = other.communicate(timeout=100)
        for thread in writers:
            thread.join()
    finally:                                   # readers end (and the worker process) on every path
        stop.set()
        if other.poll() is None:
            other.kill()
            other.wait()
        for thread in readers:
            thread.join()
    assert other.returncode == 0, err
    assert not errors, errors
    assert len(uploads) == 4 * 8 and deletes
    uploads += [(line["key"], line["sha256"]) for line in map(json.loads, out.splitlines()[1:])]

    # Serial model: every upload got the next version of its name; survivors = uploads - deletes.
    by_name: dict[str, list[int]] = {}
    for key, _ in uploads:
        name, version = key.split("@")
        by_name.setdefault(name, []).append(int(version))
    for name, versions in by_name.items():
        assert sorted(versions) == list(range(1, len(versions) + 1)), name
    expected = {key: digest for key, digest in uploads if key not in set(deletes)}
    rows = store._registry.all()
    assert {r.key: r.sha256 for r in rows} == expected
    assert all(r.state is AdapterState.READY for r in rows)
    referenced = {d for r in rows for d in (r.sha256, r.config_sha256)}
    assert blob_digests(store) == referenced
    verify_blobs(store)
    for name in by_name:
        survivors = sorted(int(k.split("@")[1]) for k in expected if k.split("@")[0] == name)
        if survivors:
            assert store.resolve(name, None).version == survivors[-1]
    store.close()


def test_recovery_removes_orphans_and_finishes_deletions(tmp_path):
    root = tmp_path / "store"
    store = make_store(root)
    kept = upload(store, "kept", *adapter_bytes(seed=1))
    doomed = upload(store, "doomed", *adapter_bytes(seed=2))
    store._registry.set_state("doomed", [1], AdapterState.DELETING)     # crash after marking DELETING
    orphan_staging = StagingDir(root / "tmp", "upload", store._staging_guard)
    (orphan_staging.path / "adapter_model.safetensors").write_bytes(b"partial")
    orphan_staging._lock_fd, fd = None, orphan_staging._lock_fd
    os.close(fd)                                                        # its process "died"
    live_staging = StagingDir(root / "tmp", "upload", store._staging_guard)   # a live upload elsewhere
    orphan_blob = root / "tmp" / "orphan"
    orphan_blob.write_bytes(b"x" * 10)
    store._blobs.put(orphan_blob, sha256(b"x" * 10))                    # crash between blob and row
    store.close()

    reopened = make_store(root)
    report = reopened.recovery
    assert report.deletions_finished == [doomed.key]
    assert report.staging_removed == [orphan_staging.path.name]
    collected = reopened.gc().blobs_removed if reopened.shared else []  # shared stores: GC is explicit only
    assert not (reopened.shared and report.blobs_removed)
    removed = {Path(path).name for path in report.blobs_removed + collected}   # doomed shares kept's config blob
    assert removed == {sha256(b"x" * 10), doomed.sha256}
    assert live_staging.path.exists()
    assert [r.key for r in reopened._registry.all()] == [kept.key]
    assert reopened.load(kept.key).key == kept.key
    live_staging.close()
    reopened.close()

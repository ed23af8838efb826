"""SIGKILL a process in the middle of uploads and registrations, repeatedly; recovery keeps the store whole."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loraplex.adapters_store.records import AdapterState
from store_adapters import adapter_bytes, make_store, sha256, upload, verify_blobs, write_adapter

WORKER = Path(__file__).with_name("store_worker.py")
KILLS_PER_MODE = 6


def _run_and_kill(root: Path, mode: str, args: list[str], delay_s: float) -> list[dict]:
    """Start the worker, SIGKILL it `delay_s` after it opened the store; its committed adapters."""
    env = {**os.environ, "PYTHONPATH": str(WORKER.parent)}
    child = subprocess.Popen([sys.executable, str(WORKER), str(root), mode, *args], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = child.stdout.readline()
        assert line.strip() == "ready", f"worker failed to start: {line!r} {child.stderr.read()}"
        time.sleep(delay_s)
        child.send_signal(signal.SIGKILL)
        out, _ = child.communicate(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == -signal.SIGKILL
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def _check_consistent(root: Path, must_exist: dict[str, str]) -> tuple[int, int]:
    """Recover, then: every row has its blobs and loads, every blob has a row, nothing staged remains."""
    store = make_store(root, max_lora_rank=64)
    try:
        report = store.recovery
        rows = store._registry.all()
        assert all(r.state is AdapterState.READY for r in rows), [(r.key, r.state_reason) for r in rows]
        referenced = {d for r in rows for d in (r.sha256, r.config_sha256)}
        on_disk = {p.name for p in (root / "blobs" / "sha256").rglob("*") if p.is_file()}
        assert on_disk == referenced
        assert not any((root / "tmp").iterdir())
        verify_blobs(root)
        keys = {r.key: r.sha256 for r in rows}
        for key, digest in must_exist.items():
            assert keys.get(key) == digest, f"{key} lost or changed after a crash"
        for key in keys:
            assert store.load(key).key == key                 # sha256 verified and parsed on load
        return len(report.staging_removed), len(report.blobs_removed)
    finally:
        store.close()


# 12 worker processes, each importing the store: minutes on a busy 2-core machine.
@pytest.mark.timeout(600)
def test_sigkill_during_uploads_and_registrations_leaves_a_consistent_store(tmp_path):
    root = tmp_path / "store"
    adapters = tmp_path / "adapters"
    for i in range(3):
        write_adapter(adapters / f"a{i}", rank=16, seed=100 + i)
    store = make_store(root, max_lora_rank=64)
    before = {upload(store, f"before-{i}", *adapter_bytes(seed=i)).key: sha256(adapter_bytes(seed=i)[1])
              for i in range(2)}
    store.close()
    rng = random.Random(1234)
    committed = dict(before)
    recovered_staging = recovered_blobs = 0
    for run in range(2 * KILLS_PER_MODE):
        mode, args = ("upload-loop", []) if run % 2 == 0 else ("register-loop", [str(adapters)])
        for line in _run_and_kill(root, mode, args, delay_s=rng.uniform(0.02, 0.5)):
            committed[line["key"]] = line["sha256"]
        staging, blobs = _check_consistent(root, committed)
        recovered_staging += staging
        recovered_blobs += blobs
    print(f"recovered: {recovered_staging} staging dirs, {recovered_blobs} orphan blobs, {len(committed)} adapters")
    assert recovered_staging > 0, "no kill landed in the middle of an upload; the test proved nothing"

"""SIGKILL of a `loraplex serve` on PostgreSQL + S3 in the middle of uploads, 10 cycles (slow;
`make test-store-shared`).

Each cycle starts a server on the same shared store, completes one upload through it (that one
must survive every later crash), then streams a second upload in 1 KiB chunks and SIGKILLs the
server once a random number of chunks is sent, or (every third cycle) just after the last chunk,
while the server validates, writes the blobs to S3 and commits the registry row. Afterwards: `loraplex store gc` (the
operators' command) leaves exactly the blobs the registry refers to (no row without its blobs,
no blob that GC would keep forever), and a fresh server serves every completed upload with the
greedy tokens it gave right after its upload (blobs re-read from S3, sha256 verified).
"""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest

from grpc_harness import make_peft_adapter
from loraplex.client.upload import upload_requests, validate_adapter_dir
from loraplex.v1 import adapters_pb2_grpc
from test_shared_store import _client, _greedy, start_server

pytestmark = pytest.mark.slow
CYCLES = 10


class SlowUpload(threading.Thread):
    """Streams an upload in 1 KiB chunks `pause_s` apart; `reached` is set once `kill_after`
    chunks are sent (kill_after = all of them: the server is then validating and committing)."""

    def __init__(self, address: str, path: Path, adapter_id: str, pause_s: float):
        super().__init__(daemon=True)
        self.address, self.pause_s = address, pause_s
        self.requests = list(upload_requests(validate_adapter_dir(path), adapter_id, chunk_bytes=1024))
        self.kill_after = len(self.requests)                 # set before start()
        self.reached = threading.Event()
        self.sent = 0
        self.outcome: str | None = None            # "committed", or the gRPC status the kill caused

    def _stream(self):
        for request in self.requests:
            yield request
            self.sent += 1
            if self.sent >= self.kill_after:
                self.reached.set()
            time.sleep(self.pause_s)

    def run(self) -> None:
        with grpc.insecure_channel(self.address) as channel:
            try:
                adapters_pb2_grpc.AdapterServiceStub(channel).UploadAdapter(self._stream(), timeout=300)
                self.outcome = "committed"
            except grpc.RpcError as error:                     # the kill: UNAVAILABLE / reset
                self.outcome = error.code().name
            finally:
                self.reached.set()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _blob_digests(s3_service, blobs_url: str) -> set[str]:
    prefix = blobs_url.removeprefix(f"s3://{s3_service.bucket}/").rstrip("/") + "/blobs/sha256/"
    pages = s3_service.client().get_paginator("list_objects_v2").paginate(Bucket=s3_service.bucket, Prefix=prefix)
    return {item["Key"].rsplit("/", 1)[-1] for page in pages for item in page.get("Contents", [])}


def _store_gc(store: Path, registry: str, blobs: str) -> str:
    result = subprocess.run([sys.executable, "-m", "loraplex.cli", "store", "gc", "--store", str(store),
                             "--store-registry", registry, "--store-blobs", blobs, "--stale-delete-after", "0"],
                            capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.timeout(3600)
def test_sigkill_mid_upload_ten_cycles_keeps_the_shared_store_whole(tiny_llama_dir, postgres_service,
                                                                   s3_service, tmp_path):
    registry, blobs = postgres_service.new_database(), s3_service.new_prefix()
    source = f"s3://{s3_service.bucket}/sources-{blobs.rsplit('-', 1)[-1]}"
    store = tmp_path / "store"
    # Rank 32 on every projection: ~100 KiB of weights, ~100 chunks per upload.
    victims = [make_peft_adapter(tiny_llama_dir, tmp_path / f"victim{i}", seed=200 + i, rank=32,
                                 targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                          "down_proj")) for i in range(CYCLES)]
    kept = [make_peft_adapter(tiny_llama_dir, tmp_path / f"kept{i}", seed=100 + i) for i in range(CYCLES)]
    rng = random.Random(2026)
    outcomes: list[tuple[int, int, int, str | None]] = []
    expected: dict[str, list[int]] = {}
    referenced: set[str] = set()
    for cycle in range(CYCLES):
        process, address, lines = start_server(tiny_llama_dir, store, registry, blobs, source)
        try:
            with _client(address) as client:
                client.upload_adapter(kept[cycle], f"kept-{cycle}")
                expected[f"kept-{cycle}"] = _greedy(client, f"kept-{cycle}")
            referenced |= {_sha256(kept[cycle] / name)
                           for name in ("adapter_config.json", "adapter_model.safetensors")}
            uploader = SlowUpload(address, victims[cycle], f"victim-{cycle}", 0.002)
            total = len(uploader.requests)
            # Kill points: mid-stream at a random chunk, or (every third cycle) after the last
            # chunk, while the server validates, writes the blobs to S3 and commits the row.
            uploader.kill_after = total if cycle % 3 == 2 else rng.randrange(1, total)
            uploader.start()
            assert uploader.reached.wait(120), "the upload never reached its kill point"
            if uploader.kill_after == total:
                time.sleep(rng.uniform(0.0, 0.05))
        finally:
            process.kill()
            process.wait()
        uploader.join(timeout=120)
        assert not uploader.is_alive(), "the upload stream did not end when its server died"
        outcomes.append((cycle, uploader.sent, total, uploader.outcome))
        assert uploader.outcome is not None, "the uploading thread failed"

    print("kills (cycle, chunks sent, chunks in all, outcome):", outcomes)
    assert sum(sent < total for _, sent, total, _ in outcomes) >= 5        # most kills land mid-stream
    report = _store_gc(store, registry, blobs)
    process, address, lines = start_server(tiny_llama_dir, store, registry, blobs, source)
    try:
        with _client(address) as client:
            listed = {info.adapter_id: info for info in client.list_adapters()}
            for adapter_id, tokens in expected.items():
                assert _greedy(client, adapter_id) == tokens, f"{adapter_id} changed after the crashes"
            survivors = [name for name in listed if name.startswith("victim-")]
            for name in survivors:                            # a victim that committed before its kill is whole
                referenced |= {listed[name].sha256}
                client.generate("x", name, max_new_tokens=2)
    finally:
        process.kill()
        process.wait()
    assert set(expected) <= set(listed)
    digests = _blob_digests(s3_service, blobs)
    weights = {info.sha256 for info in listed.values()}
    assert weights <= digests, "a registry row lost its blob"
    # After GC every blob belongs to a listed version: kept adapters' config + weights, and the
    # victims that committed (their config blob has the same bytes-hash as computed locally).
    for name in survivors:
        index = int(name.removeprefix("victim-"))
        referenced.add(_sha256(victims[index] / "adapter_config.json"))
    assert digests == referenced, f"blobs GC would keep forever: {sorted(digests - referenced)}\n{report}"
    print(f"{len(survivors)} of {CYCLES} killed uploads had committed; gc: {report.strip()}")

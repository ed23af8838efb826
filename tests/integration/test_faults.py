"""Fault injection against a real server on the tiny model.

(a) an adapter blob corrupted on disk after registration; (b) one request whose forward pass
raises inside the engine while others share its batch; (c) the store's disk filling up in the
middle of an upload (a real 2 MiB tmpfs; skipped where `mount` is not permitted); (d) SIGKILL
under traffic, restart on the same store, SDK retries across the outage.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest

from grpc_harness import LoopThread, make_peft_adapter, start_full_server, upload_requests
from loraplex.server.app import drain_and_stop
from loraplex.server.config import load_server_config
from loraplex.v1 import adapters_pb2 as apb
from loraplex.v1 import adapters_pb2_grpc, generation_pb2_grpc
from loraplex.v1 import generation_pb2 as gen

POISON = "POISONED-REQUEST"


def _config(tiny_llama_dir, store, **extra):
    settings = {"model": str(tiny_llama_dir), "port": "0", "metrics_port": "0", "store": str(store),
                "kv_cache_memory": "16MiB", "max_num_seqs": "8", "max_queued_requests": "32",
                "max_total_tokens": "512", "max_input_tokens": "256", "max_new_tokens": "64", "max_loras": "4"}
    settings.update({k: str(v) for k, v in extra.items()})
    return load_server_config(settings, {})


@pytest.fixture(scope="module")
def server(tiny_llama_dir, tmp_path_factory):
    loop = LoopThread()
    running = loop.run(start_full_server(_config(tiny_llama_dir, tmp_path_factory.mktemp("store")),
                                         engine_process=False))     # injects faults into the engine object
    channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
    stub = adapters_pb2_grpc.AdapterServiceStub(channel)
    for seed, name in ((11, "healthy"), (12, "doomed")):
        directory = make_peft_adapter(tiny_llama_dir, tmp_path_factory.mktemp(name), seed)
        stub.UploadAdapter(upload_requests(directory, name), timeout=20)
    yield running, channel
    channel.close()
    loop.run(drain_and_stop(running, 1.0, log=lambda _m: None))
    loop.close()


def _request(prompt: str, adapter: str = "", n: int = 12) -> gen.GenerateRequest:
    return gen.GenerateRequest(input=gen.GenerationInput(prompt=prompt, adapter_id=adapter,
                               sampling=gen.SamplingParams(max_new_tokens=n, ignore_eos=True)))


def _generate(channel, prompt: str, adapter: str = "", n: int = 12):
    return generation_pb2_grpc.GenerationServiceStub(channel).Generate(_request(prompt, adapter, n), timeout=20)


def _idle(running, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = running.state.engine.stats()
        if stats.num_running == stats.num_waiting == 0 and stats.num_free_blocks == stats.num_total_blocks:
            return stats
        time.sleep(0.02)
    raise AssertionError(f"engine not idle: {running.state.engine.stats()}")


def test_corrupted_blob_fails_precondition_and_quarantines(server):
    running, channel = server
    store = running.state.store
    record = store.resolve("doomed", None)
    assert not store.is_loaded(record.key), "the blob must be read from disk for this test"
    blob = store._blobs.path(record.sha256)                  # noqa: SLF001 - the on-disk file under test
    os.chmod(blob, 0o644)
    data = bytearray(blob.read_bytes())
    data[-8:] = bytes(b ^ 0xFF for b in data[-8:])           # flip the last weight bytes; size unchanged
    blob.write_bytes(bytes(data))
    before = _generate(channel, "A healthy prompt", "healthy").token_ids
    for _ in range(2):                                        # first detection, then the quarantine
        with pytest.raises(grpc.RpcError) as caught:
            _generate(channel, "The doomed prompt", "doomed")
        assert caught.value.code() is grpc.StatusCode.FAILED_PRECONDITION, caught.value.details()
        assert str(blob.parent) not in caught.value.details()
    with pytest.raises(Exception, match="quarantined"):
        store._loadable(record.key)                          # noqa: SLF001
    assert _generate(channel, "A healthy prompt", "healthy").token_ids == before
    assert len(_generate(channel, "Base model prompt").token_ids) == 12
    _idle(running)


class PoisonRunner:
    """Test-only fault: wraps the real runner and raises for any batch that holds the poisoned
    request (found by its prompt tokens). Installed in-process by this test; nothing reaches it
    from the network."""

    def __init__(self, real, poison_ids: list[int]):
        self.real, self.poison_ids, self.raised = real, poison_ids, 0

    def __getattr__(self, name):
        return getattr(self.real, name)

    def run(self, batch, adapter_slots=None):
        n = len(self.poison_ids)
        if any(item.seq.prompt_token_ids[:n] == self.poison_ids for item in batch.items):
            self.raised += 1
            raise RuntimeError("injected fault: the poisoned request's forward pass")
        return self.real.run(batch, adapter_slots)


def test_failing_request_gets_internal_and_its_batch_mates_finish(server):
    running, channel = server
    prompts = [f"Story number {i} begins" for i in range(5)]
    expected = [_generate(channel, p, "healthy" if i % 2 else "").token_ids for i, p in enumerate(prompts)]
    llm = running.state.engine.engine
    poison_ids = llm.tokenizer.encode(POISON, add_special_tokens=False)
    real = llm.runner
    llm.runner = PoisonRunner(real, poison_ids)
    try:
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            poisoned = pool.submit(_generate, channel, POISON + " tail", "", 40)
            time.sleep(0.05)
            others = [pool.submit(_generate, channel, p, "healthy" if i % 2 else "") for i, p in enumerate(prompts)]
            got = [f.result(timeout=120).token_ids for f in others]
            with pytest.raises(grpc.RpcError) as caught:
                poisoned.result(timeout=120)
    finally:
        llm.runner = real
    assert caught.value.code() is grpc.StatusCode.INTERNAL
    assert llm.runner is real and running.state.engine.stats().num_running == 0
    assert got == expected                                   # same tokens as when each ran without the fault
    _idle(running)


def _tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                            capture_output=True, text=True)
    return result.returncode == 0


def test_disk_full_mid_upload_is_rejected_cleanly(tiny_llama_dir, tmp_path):
    mount = tmp_path / "small-disk"
    if not _tmpfs(mount, "2m"):
        pytest.skip("mounting a tmpfs is not permitted here (needs root)")
    loop = LoopThread()
    try:
        running = loop.run(start_full_server(_config(tiny_llama_dir, mount / "store")))
        channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
        stub = adapters_pb2_grpc.AdapterServiceStub(channel)
        small = make_peft_adapter(tiny_llama_dir, tmp_path / "small", seed=5)
        stub.UploadAdapter(upload_requests(small, "fits"), timeout=20)
        files_before = sorted(p.relative_to(mount) for p in mount.rglob("*") if p.is_file() and "tmp" not in p.parts)
        weights = os.urandom(6 * 2**20)                       # three times the disk
        config = (Path(small) / "adapter_config.json").read_bytes()
        meta = apb.UploadMetadata(adapter_id="too-big", config_size=len(config), weights_size=len(weights),
                                  config_sha256=hashlib.sha256(config).hexdigest(),
                                  weights_sha256=hashlib.sha256(weights).hexdigest())
        messages = [apb.UploadAdapterRequest(metadata=meta),
                    apb.UploadAdapterRequest(chunk=apb.UploadChunk(file=apb.ADAPTER_FILE_CONFIG, data=config))]
        messages += [apb.UploadAdapterRequest(chunk=apb.UploadChunk(file=apb.ADAPTER_FILE_WEIGHTS,
                                                                   data=weights[i:i + 2**20]))
                     for i in range(0, len(weights), 2**20)]
        with pytest.raises(grpc.RpcError) as caught:
            stub.UploadAdapter(iter(messages), timeout=20)
        assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, caught.value.details()
        assert str(mount) not in caught.value.details()
        deadline = time.monotonic() + 60                      # the staging dir is removed as the upload aborts
        while _staged(mount) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _staged(mount) == [], "a partial upload was left on disk"
        assert [a.adapter_id for a in stub.ListAdapters(apb.ListAdaptersRequest(), timeout=10).adapters] == ["fits"]
        files_after = sorted(p.relative_to(mount) for p in mount.rglob("*") if p.is_file() and "tmp" not in p.parts)
        assert set(files_after) <= set(files_before) | {p for p in files_after if p.suffix in
                                                                          (".db-wal", ".db-shm", ".db-journal")}
        stub.UploadAdapter(upload_requests(small, "fits-again"), timeout=60)   # space came back
        channel.close()
        loop.run(drain_and_stop(running, 1.0, log=lambda _m: None))
    finally:
        loop.close()
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def _staged(mount: Path) -> list[Path]:
    return [p for p in (mount / "store").rglob("*") if p.is_file() and "tmp" in p.relative_to(mount).parts]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _serve(tiny_llama_dir, store, port: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "loraplex.cli", "serve", "--model", str(tiny_llama_dir), "--port", str(port),
               "--metrics-port", "0", "--http-port", "0", "--store", str(store), "--kv-cache-memory", "16MiB",
               "--max-total-tokens", "512", "--max-input-tokens", "256"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in process.stdout:
        if line.startswith("loraplex: serving"):
            threading.Thread(target=lambda: [None for _ in process.stdout], daemon=True).start()
            return process
    raise AssertionError(f"server exited with {process.wait()} before its ready line")


def test_sigkill_under_traffic_then_restart_recovers(tiny_llama_dir, tmp_path):
    from loraplex.client import Client, RetryPolicy
    from loraplex.client.errors import LoraplexError

    port, store = _free_port(), tmp_path / "store"
    process = _serve(tiny_llama_dir, store, port)
    adapter = make_peft_adapter(tiny_llama_dir, tmp_path / "adapter", seed=21)
    # The test waits on conditions (the ready line, the stream's end), never on a retry budget: the
    # few retries only cover the channel reconnecting to the restarted server.
    client = Client(f"127.0.0.1:{port}", timeout=120,
                    retry=RetryPolicy(max_attempts=4, initial_backoff_s=0.5, max_backoff_s=2.0))
    try:
        client.upload_adapter(adapter, "survivor")
        expected = client.generate("After the crash", "survivor", max_new_tokens=8, ignore_eos=True).token_ids
        raw = grpc.insecure_channel(f"127.0.0.1:{port}")
        in_flight = generation_pb2_grpc.GenerationServiceStub(raw).GenerateStream(gen.GenerateStreamRequest(
            input=_request("Long running", n=400).input), timeout=120)
        next(in_flight)                                        # the request is running
        process.kill()                                         # SIGKILL under traffic
        process.wait(10)
        with pytest.raises(grpc.RpcError) as caught:
            list(in_flight)
        assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
        with pytest.raises(LoraplexError) as down:
            Client(f"127.0.0.1:{port}", timeout=5, retry=RetryPolicy(max_attempts=1)).info()
        assert down.value.code is grpc.StatusCode.UNAVAILABLE
        process = _serve(tiny_llama_dir, store, port)          # returns once the server is ready
        after = client.generate("After the crash", "survivor", max_new_tokens=8, ignore_eos=True)
        assert after.token_ids == expected
        assert [a.adapter_id for a in client.list_adapters()] == ["survivor"]
    finally:
        client.close()
        process.kill()
        process.wait(10)

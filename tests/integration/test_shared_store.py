"""Two `loraplex serve` processes on one PostgreSQL registry and one S3 bucket (tiny random model).

An adapter uploaded through one generates the same greedy tokens through the other; a delete on
one is seen by the other at its next request; 2 x 50 concurrent uploads of new versions of one id
give 100 distinct versions; S3 or PostgreSQL stopped under traffic: cached adapters keep serving,
cold ones get UNAVAILABLE with a retry hint, and both servers recover.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from grpc_harness import make_peft_adapter, wait_for_line
from loraplex.client import Client
from loraplex.client._retry import RetryPolicy
from loraplex.client.errors import AdapterNotFoundError, ServerUnavailableError

READY = re.compile(r"^loraplex: serving .* on 127\.0\.0\.1:(\d+), metrics")
PROMPT = "The quick brown fox"


def start_server(tiny_llama_dir: Path, store: Path, registry: str, blobs: str, source: str,
                 extra_env: dict | None = None) -> tuple[subprocess.Popen, str, list[str]]:
    """A `loraplex serve` subprocess on the shared store; (process, address, output lines)."""
    environ = dict(os.environ, LORAPLEX_KV_CACHE_MEMORY="16MiB", LORAPLEX_STORE_REGISTRY=registry,
                   LORAPLEX_STORE_BLOBS=blobs, **(extra_env or {}))
    command = [sys.executable, "-m", "loraplex.cli", "serve", "--model", str(tiny_llama_dir), "--port", "0",
               "--metrics-port", "0", "--store", str(store), "--max-total-tokens", "1024",
               "--max-input-tokens", "256", "--adapter-source", source, "--cpu-kernels", "torch",
               "--linear-kernel", "aten", "--http-port", "0"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environ)
    lines: list[str] = []
    match = wait_for_line(process, READY, lines, 400)
    if match:
        return process, f"127.0.0.1:{match.group(1)}", lines
    process.kill()
    process.wait()
    raise AssertionError("no ready line:\n" + "\n".join(lines))


@pytest.fixture(scope="module")
def cluster(tiny_llama_dir, postgres_service, s3_service, tmp_path_factory):
    registry, blobs = postgres_service.new_database(), s3_service.new_prefix()
    source = f"s3://{s3_service.bucket}/sources-{blobs.rsplit('-', 1)[-1]}"
    base = tmp_path_factory.mktemp("shared")
    processes = []
    try:
        for name in ("a", "b"):
            processes.append(start_server(tiny_llama_dir, base / f"store-{name}", registry, blobs, source))
        adapter = make_peft_adapter(tiny_llama_dir, base / "adapter", seed=3)
        other = make_peft_adapter(tiny_llama_dir, base / "other", seed=4)
        yield {"addresses": [p[1] for p in processes], "adapter": adapter, "other": other, "source": source,
               "logs": [p[2] for p in processes], "tmp": base}
    finally:
        for process, _, _ in processes:
            process.kill()
            process.wait()


def _client(address: str, attempts: int = 1) -> Client:
    return Client(address, timeout=120, retry=RetryPolicy(max_attempts=attempts))


def _greedy(client: Client, adapter: str | None) -> list[int]:
    return client.generate(PROMPT, adapter, max_new_tokens=12, temperature=0, ignore_eos=True).token_ids


def test_upload_on_one_serves_on_the_other_and_delete_is_seen(cluster):
    a, b = (_client(address) for address in cluster["addresses"])
    with a, b:
        record = a.upload_adapter(cluster["adapter"], "shared-ad")
        assert record.ref == "shared-ad@1"
        through_a, through_b = _greedy(a, "shared-ad"), _greedy(b, "shared-ad")
        assert through_a == through_b
        assert through_b != _greedy(b, None)                       # the adapter really changes the output
        assert [x.ref for x in b.list_adapters()] == ["shared-ad@1"]
        assert b.delete_adapter("shared-ad") == [1]
        with pytest.raises(AdapterNotFoundError):
            _greedy(a, "shared-ad")                                 # cached on a, but its next request sees it


def test_concurrent_uploads_through_both_servers_get_distinct_versions(cluster):
    addresses = cluster["addresses"]
    clients = [_client(address, attempts=4) for address in addresses]

    def upload(i: int) -> int:
        return clients[i % 2].upload_adapter(cluster["adapter"], "many").version

    try:
        with ThreadPoolExecutor(max_workers=100) as pool:
            versions = list(pool.map(upload, range(100)))
    finally:
        for client in clients:
            client.close()
    assert sorted(versions) == list(range(1, 101))                 # none lost, none duplicated
    with _client(addresses[1]) as b:
        assert b.get_adapter("many").versions == list(range(1, 101))


def test_register_from_an_allowed_s3_prefix_serves_on_both(cluster, s3_service):
    prefix = cluster["source"].split("/", 3)[3]
    client = s3_service.client()
    for path in Path(cluster["adapter"]).iterdir():
        client.put_object(Bucket=s3_service.bucket, Key=f"{prefix}/team/a1/{path.name}", Body=path.read_bytes())
    a, b = (_client(address) for address in cluster["addresses"])
    with a, b:
        registered = a.register_adapter("from-s3", f"{cluster['source']}/team/a1/")
        assert registered.ref == "from-s3@1"
        assert _greedy(b, "from-s3") == _greedy(a, "from-s3")
        from loraplex.client.errors import PermissionDeniedError

        with pytest.raises(PermissionDeniedError):
            a.register_adapter("evil", f"{cluster['source']}/../elsewhere/a1/")


@pytest.mark.parametrize("backend", ["s3", "postgres"])
def test_backend_outage_under_traffic(cluster, postgres_service, s3_service, backend):
    service = s3_service if backend == "s3" else postgres_service
    a_address = cluster["addresses"][0]
    with _client(a_address) as a, _client(cluster["addresses"][1]) as b:
        hot = b.upload_adapter(cluster["adapter"], f"hot-{backend}")
        cold = b.upload_adapter(cluster["other"], f"cold-{backend}")     # other blobs: not on a's disk
        expected = _greedy(a, hot.ref)                             # now cached on a
        stop, failures, served = threading.Event(), [], []

        def traffic() -> None:
            with _client(a_address) as client:
                while not stop.is_set():
                    try:
                        served.append(_greedy(client, hot.ref) == expected)
                    except Exception as error:  # noqa: BLE001 - reported by the test
                        failures.append(error)
                        stop.wait(0.5)                             # a failure ends the test; no busy loop

        worker = threading.Thread(target=traffic, daemon=True)
        worker.start()
        try:
            service.stop()
            with pytest.raises(ServerUnavailableError) as error:
                _greedy(a, cold.ref)                               # cold on a: needs the backend
            assert "retry" in str(error.value)
            count = len(served)
            deadline = time.monotonic() + 60
            while len(served) < count + 3 and time.monotonic() < deadline and not failures:
                time.sleep(0.05)
        finally:                                                   # the traffic thread ends on every path
            stop.set()
            try:
                service.start()
            finally:
                worker.join(timeout=120)
        assert not failures and len(served) >= count + 3 and all(served)   # cached adapter kept serving
        deadline = time.monotonic() + 60
        while True:                                                # recovers once the backend is back
            try:
                assert _greedy(a, cold.ref) == _greedy(b, cold.ref)
                break
            except ServerUnavailableError:
                assert time.monotonic() < deadline, "the server did not recover"
                time.sleep(0.5)
        while True:                                                # b's breaker may still be open
            try:
                versions = b.get_adapter(f"cold-{backend}").versions
                break
            except ServerUnavailableError:
                assert time.monotonic() < deadline, "the other server did not recover"
                time.sleep(0.5)
        assert len(versions) == 1                                  # nothing lost


def test_unreachable_registry_at_start_is_a_clear_error_and_exit(tiny_llama_dir, tmp_path):
    environ = dict(os.environ, LORAPLEX_STORE_REGISTRY="postgresql://loraplex:hunter2-pw@127.0.0.1:1/adapters")
    result = subprocess.run([sys.executable, "-m", "loraplex.cli", "serve", "--model", str(tiny_llama_dir),
                             "--port", "0", "--metrics-port", "0", "--store", str(tmp_path / "s"),
                             "--kv-cache-memory", "16MiB", "--cpu-kernels", "torch", "--http-port", "0"],
                            capture_output=True, text=True, env=environ,
                            timeout=300)
    assert result.returncode != 0
    assert "postgresql://loraplex:***@127.0.0.1:1/adapters" in result.stderr
    assert "hunter2" not in result.stdout + result.stderr

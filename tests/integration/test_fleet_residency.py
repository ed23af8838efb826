"""Two replicas on a local Ray cluster started as `loraplex fleet` starts it (slow; `make test-fleet`).

- Issue 35: residency-aware routing in the real router. Each replica's Ray loader holds one
  adapter (--max-adapters-per-replica 1). An adapter served by replica X, then pushed out of X's
  slot by another adapter, is in no replica's slot but in X's host memory: its next request goes
  to X (4 rounds; Ray's default router, which knows only slot holders, picks X with p = 1/2 each).
- Issue 37 item 7: every socket Ray's processes listen on is on loopback (--host 127.0.0.1), the
  metrics export port included, and a private adapter's id appears in none of Ray's metrics
  (`ray_serve_registered_multiplexed_model_id` carries its routing digest).
- Issue 37 item 9: a refused call leaves one short log line and no traceback; a call whose
  deadline expires is counted DEADLINE_EXCEEDED (not CANCELLED) by the replica; the token file a
  local cluster with token auth starts with is 0600 from the start.
"""

from __future__ import annotations

import ipaddress
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fleet_harness import RAY_TEST_ENV
from grpc_harness import free_port, make_peft_adapter, scrape

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow

TENANT = "team"
ADMIN_KEY, USER_KEY = f"{TENANT}:ADMINKEY12345", f"{TENANT}:USERKEY12345"
TARGETS, FILLERS = [f"target-{i}" for i in range(4)], [f"filler-{i}" for i in range(4)]
READY_LOG = re.compile(r"loraplex replica (\S+) ready \(metrics on :(\d+)\)")


def test_a_local_cluster_with_token_auth_starts_with_an_owner_only_token(tmp_path):
    """`init_ray` as `loraplex fleet` calls it, token auth left at Ray's default (on)."""
    script = """
import os, ray
from loraplex.server.config import ServerConfig
from loraplex.server.fleet.config import FleetOptions
from loraplex.server.fleet.ray_setup import init_ray, token_path
init_ray(ServerConfig(), FleetOptions())
try:
    assert ray.get(ray.remote(lambda: 1).remote(), timeout=300) == 1
    print("auth", os.environ.get("RAY_AUTH_MODE"), "mode", oct(token_path().stat().st_mode & 0o777),
          "token", len(token_path().read_text()))
finally:
    ray.shutdown()
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env.update(HOME=str(tmp_path), RAY_USAGE_STATS_ENABLED="0", RAY_worker_niceness="0")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "auth token mode 0o600 token 64" in done.stdout, done.stdout


@pytest.fixture(scope="module")
def fleet(tiny_llama_dir, tmp_path_factory):
    """2 replicas, one adapter each in Ray's loader, keys on, replica metrics on, Ray started by
    init_ray (the fleet's own: loopback node address)."""
    from ray import serve

    from loraplex.client import Client
    from loraplex.server.config import ServerConfig, parse_key
    from loraplex.server.fleet.app import start_fleet
    from loraplex.server.fleet.config import FleetOptions

    from ray._private import ray_constants

    from loraplex.server.fleet.ray_setup import SINGLE_NODE_ENV

    saved = {key: os.environ.get(key) for key in (*RAY_TEST_ENV, SINGLE_NODE_ENV)}
    single_node = ray_constants.ENABLE_RAY_CLUSTER              # init_ray switches it for a loopback fleet
    os.environ.update(RAY_TEST_ENV)
    config = ServerConfig(model=str(tiny_llama_dir), store=str(tmp_path_factory.mktemp("residency-store")), port=0,
                          metrics_port=free_port(), http_port=free_port(), kv_cache_memory="16MiB",
                          max_total_tokens=4096, max_input_tokens=512, max_new_tokens=4000, grace_period_s=10,
                          api_keys=(parse_key(USER_KEY),), admin_keys=(parse_key(ADMIN_KEY),))
    try:
        running = start_fleet(config, FleetOptions(replicas=2, replica_cpus=0.5, max_adapters_per_replica=1),
                              log=print)
        adapter = make_peft_adapter(tiny_llama_dir, tmp_path_factory.mktemp("residency-adapter") / "a", seed=5)
        with Client(f"127.0.0.1:{running.port}", api_key=ADMIN_KEY.split(":")[1], timeout=300) as client:
            for name in TARGETS + FILLERS:
                client.upload_adapter(adapter, name, private=True)        # tenant-owned: never a label
        yield running, config, serve.get_app_handle(running.app_name)
    finally:
        serve.shutdown()
        ray.shutdown()
        ray_constants.ENABLE_RAY_CLUSTER = single_node
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _view(front) -> dict[str, tuple[list[str], list[str]]]:
    return front.routing_view.remote().result(timeout_s=60)["replicas"]


def _wait_view(front, rid: str, host_holder: str, timeout_s: float = 120) -> None:
    """Until the front end's router sees `rid` in no slot and in `host_holder`'s host memory only."""
    deadline = time.monotonic() + timeout_s
    while True:
        view = _view(front)
        if (len(view) == 2 and not any(rid in slots for slots, _ in view.values())
                and [name for name, (_, host) in view.items() if rid in host] == [host_holder]):
            return
        assert time.monotonic() < deadline, f"router view for {rid}: {view}"
        time.sleep(0.5)


def test_request_goes_to_the_replica_with_the_adapter_in_host_memory(fleet):
    from loraplex.client import Client
    from loraplex.server.fleet.wire import routing_id

    running, _config, front = fleet
    with Client(f"127.0.0.1:{running.port}", api_key=USER_KEY.split(":")[1], timeout=300) as client:
        def replica_of(adapter: str) -> str:
            return client.generate("Hi", adapter_id=adapter, max_new_tokens=1).replica

        for target in TARGETS:
            first = replica_of(target)
            for filler in FILLERS * 8:                       # until a filler takes the target's slot on `first`
                if replica_of(filler) == first:
                    break
            else:
                pytest.fail(f"no filler adapter was routed to {first}")
            _wait_view(front, routing_id(target, TENANT), first)
            assert replica_of(target) == first, f"{target}: sent away from the replica holding it in host memory"
        assert front.routing_view.remote().result(timeout_s=60)["state"] == 0    # nothing kept per routing id


def _ray_processes():
    import psutil

    return psutil.Process().children(recursive=True)


def _listening() -> list[tuple[str, str, int]]:
    """(process name, address, port) of every socket Ray's processes (this driver's children) listen on."""
    import psutil

    found = []
    for process in _ray_processes():
        try:
            for conn in process.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN:
                    found.append((process.name(), conn.laddr.ip, conn.laddr.port))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def _loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return (getattr(ip, "ipv4_mapped", None) or ip).is_loopback        # ::ffff:127.0.0.1 too


def test_ray_listens_on_loopback_and_exports_no_private_adapter_id(fleet):
    import urllib.request

    from loraplex.server.fleet.wire import routing_id

    running, _config, _front = fleet
    listening = _listening()
    names = {name for name, _, _ in listening}
    assert {"gcs_server", "raylet"} <= names, listening
    assert running.port in {port for _, _, port in listening}
    exposed = [entry for entry in listening if not _loopback(entry[1])]
    assert not exposed, f"listening beyond loopback: {exposed}"

    node = next(n for n in ray.nodes() if n["Alive"])
    export_port = node["MetricsExportPort"]
    assert export_port in {port for _, _, port in listening}           # ... so on loopback too
    rid = routing_id(TARGETS[0], TENANT)
    deadline = time.monotonic() + 180
    while True:                        # Ray exports on its own period: wait until the loader's gauge is there
        body = urllib.request.urlopen(f"http://127.0.0.1:{export_port}/metrics", timeout=10).read().decode()
        if "ray_serve_registered_multiplexed_model_id" in body and any(
                routing_id(name, TENANT) in body for name in TARGETS + FILLERS):
            break
        assert time.monotonic() < deadline, "Ray never exported its multiplexed-model gauge"
        time.sleep(2)
    assert rid.startswith("a") and len(rid) == 25
    for name in TARGETS + FILLERS:
        assert name not in body, f"private adapter id {name!r} in Ray's metrics"


def _log_files() -> list[Path]:
    from ray._private import worker

    return [path for path in Path(worker._global_node.get_logs_dir_path()).rglob("*") if path.is_file()]


def _count(pattern: str) -> int:
    total = 0
    for path in _log_files():
        try:
            total += path.read_text(errors="replace").count(pattern)
        except OSError:
            continue
    return total


def test_refused_calls_leave_one_short_line_and_no_traceback(fleet):
    import grpc
    import httpx

    from loraplex.v1 import generation_pb2, generation_pb2_grpc

    running, config, _front = fleet
    calls = 5
    stream_line = "refused /loraplex.v1.GenerationService/GenerateStream: UNAUTHENTICATED"
    unary_line = "refused /loraplex.v1.GenerationService/Generate: UNAUTHENTICATED"
    http_line = "refused POST '/v1/completions': 401"
    before = {line: _count(line) for line in (stream_line, unary_line, http_line, "Traceback")}
    request = generation_pb2.GenerationInput(prompt="x", adapter_id=TARGETS[0])
    with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        for _ in range(calls):
            with pytest.raises(grpc.RpcError) as stream_refused:
                list(stub.GenerateStream(generation_pb2.GenerateStreamRequest(input=request), timeout=30))
            assert stream_refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as unary_refused:
                stub.Generate(generation_pb2.GenerateRequest(input=request), timeout=30)
            assert unary_refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
            http = httpx.post(f"http://127.0.0.1:{config.http_port}/v1/completions",
                              json={"model": TARGETS[0], "prompt": "x"}, timeout=30)
            assert http.status_code == 401
    deadline = time.monotonic() + 60
    while any(_count(line) - before[line] < calls for line in (stream_line, unary_line, http_line)):
        assert time.monotonic() < deadline, {line: _count(line) - before[line] for line in before}
        time.sleep(0.5)
    time.sleep(2)                                                     # anything else they would have logged
    added = {line: _count(line) - before[line] for line in before}
    assert added == {stream_line: calls, unary_line: calls, http_line: calls, "Traceback": 0}, added


def _replica_metrics_ports() -> dict[str, int]:
    """Replica name -> its /metrics port, from the replicas' ready lines in Ray's logs."""
    found = {}
    for path in _log_files():
        try:
            found.update(READY_LOG.findall(path.read_text(errors="replace")))
        except OSError:
            continue
    return {name: int(port) for name, port in found.items()}


def _by_code(ports: dict[str, int]) -> dict[str, float]:
    """loraplex_requests_total summed over the replicas, by (method, code)."""
    counts: dict[str, float] = {}
    for port in ports.values():
        for (name, labels), value in scrape(port).items():
            if name == "loraplex_requests_total" and value:
                key = f"{dict(labels).get('method')} {dict(labels).get('code')}"
                counts[key] = counts.get(key, 0) + value
    return counts


def _requests(code: str, ports: dict[str, int]) -> float:
    return sum(value for key, value in _by_code(ports).items() if key.endswith(f" {code}"))


def test_an_expired_deadline_is_counted_as_deadline_exceeded(fleet):
    from loraplex.client import Client
    from loraplex.client.errors import DeadlineExceededError

    running, _config, _front = fleet
    ports = _replica_metrics_ports()
    assert len(ports) == 2, ports
    before = {code: _requests(code, ports) for code in ("DEADLINE_EXCEEDED", "CANCELLED")}
    with Client(f"127.0.0.1:{running.port}", api_key=USER_KEY.split(":")[1], timeout=300) as client:
        with pytest.raises(DeadlineExceededError):                    # a stream, ended by its deadline
            for _chunk in client.generate_stream("Count:", max_new_tokens=4000, ignore_eos=True, timeout=1.5):
                pass
        with pytest.raises(DeadlineExceededError):                    # a unary call
            client.generate("Count:", max_new_tokens=4000, ignore_eos=True, timeout=1.5)
    deadline = time.monotonic() + 120
    while _requests("DEADLINE_EXCEEDED", ports) + _requests("CANCELLED", ports) - sum(before.values()) < 2:
        assert time.monotonic() < deadline, f"the replicas never recorded the two calls: {_by_code(ports)}"
        time.sleep(0.5)
    assert _requests("DEADLINE_EXCEEDED", ports) - before["DEADLINE_EXCEEDED"] == 2
    assert _requests("CANCELLED", ports) == before["CANCELLED"]

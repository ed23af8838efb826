"""The engine core in its own process (issue 36): a real SIGKILL of the core fails in-flight
requests with UNAVAILABLE, health goes NOT_SERVING, a new core starts and serving resumes; a
front end that dies takes its core with it (no orphans)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from grpc_harness import LoopThread, free_port, start_full_server, wait_for_line
from loraplex.server.app import drain_and_stop
from loraplex.server.config import load_server_config
from loraplex.v1 import generation_pb2 as gen
from loraplex.v1 import generation_pb2_grpc


def _wait(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _health(channel) -> int:
    try:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status
    except grpc.RpcError:
        return -1


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:                         # a zombie (exited, not yet reaped) is dead too
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture(scope="module")
def process_server(tiny_llama_dir, tmp_path_factory):
    loop = LoopThread()
    config = load_server_config({
        "model": str(tiny_llama_dir), "port": "0", "metrics_port": "0", "store": str(tmp_path_factory.mktemp("store")),
        "kv_cache_memory": "16MiB", "max_total_tokens": "2048", "max_input_tokens": "512",
        "cpu_kernels": "torch"}, {})      # a restart needs no kernel build (a busy shared cache)
    running = loop.run(start_full_server(config, engine_process=True))   # whatever --engine-process says
    channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
    yield running, channel
    channel.close()
    loop.run(drain_and_stop(running, 1.0, log=lambda _m: None))
    loop.close()


def test_the_core_runs_with_a_short_openmp_spin(process_server):
    """The core's environment carries GOMP_SPINCOUNT (process.py CORE_SPIN_COUNT: libgomp's
    default spin collapses a one-team process on a busy machine); the front end's does not."""
    from loraplex.server.engine.proc.process import CORE_SPIN_COUNT

    running, _channel = process_server
    with open(f"/proc/{running.state.engine.core_pid}/environ", "rb") as environ:
        variables = dict(item.split(b"=", 1) for item in environ.read().split(b"\0") if b"=" in item)
    assert variables[b"GOMP_SPINCOUNT"] == CORE_SPIN_COUNT.encode()
    assert "GOMP_SPINCOUNT" not in os.environ


def test_sigkill_of_the_core_fails_in_flight_unavailable_then_serving_resumes(process_server):
    running, channel = process_server
    engine = running.state.engine
    stub = generation_pb2_grpc.GenerationServiceStub(channel)
    first_pid = engine.core_pid
    assert first_pid is not None and first_pid != os.getpid()
    assert _health(channel) == health_pb2.HealthCheckResponse.SERVING
    before = stub.Generate(gen.GenerateRequest(input=gen.GenerationInput(
        prompt="The quick brown fox", sampling=gen.SamplingParams(max_new_tokens=6, ignore_eos=True))), timeout=60)
    stream = stub.GenerateStream(gen.GenerateStreamRequest(input=gen.GenerationInput(
        prompt="Count with me:", sampling=gen.SamplingParams(max_new_tokens=1500, ignore_eos=True))), timeout=120)
    assert next(stream).token_ids                      # running in the core
    os.kill(first_pid, signal.SIGKILL)
    with pytest.raises(grpc.RpcError) as error:
        list(stream)
    assert error.value.code() is grpc.StatusCode.UNAVAILABLE
    _wait(lambda: engine.core_pid not in (None, first_pid), 300, "a new engine core")
    _wait(lambda: _health(channel) == health_pb2.HealthCheckResponse.SERVING, 30, "SERVING again")
    assert not _pid_alive(first_pid)
    after = stub.Generate(gen.GenerateRequest(input=gen.GenerationInput(
        prompt="The quick brown fox", sampling=gen.SamplingParams(max_new_tokens=6, ignore_eos=True))), timeout=60)
    assert list(after.token_ids) == list(before.token_ids)       # same model, greedy


def test_health_is_not_serving_while_the_core_restarts(process_server):
    running, channel = process_server
    engine = running.state.engine
    pid = engine.core_pid
    os.kill(pid, signal.SIGKILL)
    # The receiver notices within its poll interval; the new core needs seconds to load the model.
    _wait(lambda: _health(channel) == health_pb2.HealthCheckResponse.NOT_SERVING or
          engine.core_pid not in (None, pid), 30, "NOT_SERVING")
    assert not engine.alive() or engine.core_pid != pid
    _wait(lambda: engine.alive() and _health(channel) == health_pb2.HealthCheckResponse.SERVING, 300, "SERVING")


READY = re.compile(r"^loraplex: serving .* on 127\.0\.0\.1:(\d+), metrics on :(\d+)$")
CORE = re.compile(r".*engine core ready in process (\d+)")


def test_core_exits_when_the_front_end_is_killed(tiny_llama_dir, tmp_path):
    environ = dict(os.environ, LORAPLEX_KV_CACHE_MEMORY="16MiB", LORAPLEX_HTTP_PORT="0",
                   LORAPLEX_ENGINE_PROCESS="on")
    command = [sys.executable, "-m", "loraplex.cli", "serve", "--model", str(tiny_llama_dir), "--port", "0",
               "--metrics-port", str(free_port()), "--store", str(tmp_path / "store"),
               "--max-total-tokens", "2048", "--max-input-tokens", "512", "--cpu-kernels", "torch"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environ)
    lines: list[str] = []
    try:
        core = wait_for_line(process, CORE, lines, 600)
        assert core, "no core line:\n" + "\n".join(lines)
        core_pid = int(core.group(1))
        _wait(lambda: any(READY.match(line) for line in lines), 120, "the ready line")
        assert _pid_alive(core_pid)
        process.kill()                                  # SIGKILL: no chance to shut the core down
        process.wait(30)
        _wait(lambda: not _pid_alive(core_pid), 30, "the orphaned core to exit")
    finally:
        if process.poll() is None:
            process.kill()

"""`loraplex serve` as a subprocess on the tiny model: ready line, health, SIGTERM drain, exit 0."""

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

from grpc_harness import free_port, wait_for_line
from loraplex.v1 import generation_pb2 as gen
from loraplex.v1 import generation_pb2_grpc

READY = re.compile(r"^loraplex: serving .* on 127\.0\.0\.1:(\d+), metrics on :(\d+)$")


def _start(tiny_llama_dir, store, http_port: int = 0) -> tuple[subprocess.Popen, int, list[str]]:
    environ = dict(os.environ, LORAPLEX_KV_CACHE_MEMORY="16MiB", LORAPLEX_GRACE_PERIOD="60",
                   LORAPLEX_HTTP_PORT=str(http_port))
    command = [sys.executable, "-m", "loraplex.cli", "serve", "--model", str(tiny_llama_dir), "--port", "0",
               "--metrics-port", str(free_port()), "--store", str(store), "--max-total-tokens", "2048",
               "--max-input-tokens", "512"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environ)
    lines: list[str] = []
    match = wait_for_line(process, READY, lines, 600)      # a busy machine may be compiling the kernels
    if match:
        return process, int(match.group(1)), lines
    process.kill()
    pytest.fail("no ready line:\n" + "\n".join(lines))


def _serving(health) -> bool:
    try:
        return health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == \
            health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:       # already stopped listening: certainly not serving
        return False


def test_sigterm_drains_in_flight_and_exits_zero(tiny_llama_dir, tmp_path):
    http_port = free_port()
    process, port, lines = _start(tiny_llama_dir, tmp_path / "store", http_port)
    try:
        import httpx

        ready = f"http://127.0.0.1:{http_port}/ready"
        assert httpx.get(ready, timeout=10).json() == {"status": "ready"}     # same process, same engine
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == health_pb2.HealthCheckResponse.SERVING
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        request = gen.GenerateStreamRequest(input=gen.GenerationInput(
            prompt="Count with me:", sampling=gen.SamplingParams(max_new_tokens=1200, ignore_eos=True)))
        stream = stub.GenerateStream(request, timeout=120)
        received = list(next(stream).token_ids)
        process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        while _serving(health):
            assert time.monotonic() < deadline, "health never left SERVING after SIGTERM"
            time.sleep(0.01)
        with pytest.raises(grpc.RpcError) as error:
            stub.Generate(gen.GenerateRequest(input=gen.GenerationInput(prompt="late")), timeout=10)
        assert error.value.code() is grpc.StatusCode.UNAVAILABLE
        late = httpx.post(f"http://127.0.0.1:{http_port}/v1/completions", json={"prompt": "late"}, timeout=10)
        assert late.status_code == 503 and late.json()["error"]["type"] == "service_unavailable"
        chunks = list(stream)
        received += [t for chunk in chunks for t in chunk.token_ids]
        assert chunks[-1].finish_reason == gen.FINISH_REASON_LENGTH
        assert len(received) == 1200
        assert process.wait(timeout=60) == 0
        channel.close()
    finally:
        if process.poll() is None:
            process.kill()
    assert any("draining" in line for line in lines)

"""`loraplex fleet` with one replica (fast; the 2-replica suite is test_fleet_scale.py, `make test-fleet`).

A real local Ray cluster started by the CLI, the fleet's front end, the SDK unchanged: upload,
generate (tokens equal a plain `loraplex serve` on the same store), typed errors through the front end,
the `loraplex-replica` trailer, the replica's fleet metrics, SIGTERM drains a stream in flight (Ray's
graceful replica shutdown, as on scale-down) and exits 0. The front end holds serve's line (issue 37):
loopback only, oversized messages refused before a replica sees them, health per service answered
locally, no Ray internals in any status; and the OpenAI HTTP API goes through it (issue 35).
"""

from __future__ import annotations

import signal

import pytest

from fleet_harness import LOOPBACK, FleetProcess, fleet_env, listening_addresses
from grpc_harness import free_port, make_peft_adapter, scrape

pytest.importorskip("ray.serve")
USER_KEY, ADMIN_KEY = "team:USERKEY12345", "ADMINKEY12345"


@pytest.fixture(scope="module")
def adapter_dir(tiny_llama_dir, tmp_path_factory):
    return make_peft_adapter(tiny_llama_dir, tmp_path_factory.mktemp("fleet-adapter") / "a", seed=3)


def _plain_serve_generation(tiny_llama_dir, store, prompt, adapter, max_new_tokens):
    """The same call against a plain in-process `loraplex serve` on the same store."""
    from grpc_harness import LoopThread, start_full_server
    from loraplex.client import Client
    from loraplex.server.app import drain_and_stop
    from loraplex.server.config import ServerConfig

    config = ServerConfig(model=str(tiny_llama_dir), store=str(store), port=0, metrics_port=0,
                          kv_cache_memory="16MiB", max_total_tokens=1024, max_input_tokens=512)
    loop = LoopThread()
    running = loop.run(start_full_server(config), timeout=900)       # a busy shared machine loads slowly
    try:
        with Client(f"127.0.0.1:{running.port}", timeout=120) as client:
            return client.generate(prompt, adapter_id=adapter, max_new_tokens=max_new_tokens)
    finally:
        loop.run(drain_and_stop(running, 5, log=lambda _m: None))
        loop.close()


def test_one_replica_fleet_serves_the_sdk_unchanged(tiny_llama_dir, adapter_dir, tmp_path):
    from loraplex.client import Client
    from loraplex.client.errors import (AdapterNotFoundError, AuthenticationError, PermissionDeniedError,
                                        ValidationError)

    store, metrics_port, http_port = tmp_path / "store", free_port(), free_port()
    fleet = FleetProcess(["--model", str(tiny_llama_dir), "--store", str(store), "--port", "0",
                          "--metrics-port", str(metrics_port), "--http-port", str(http_port), "--replicas", "1", "--replica-cpus", "0.5",
                          "--max-total-tokens", "1024", "--max-input-tokens", "512", "--grace-period", "30",
                          "--api-key", USER_KEY, "--admin-key", ADMIN_KEY],
                         fleet_env())
    try:
        with Client(f"127.0.0.1:{fleet.port}", timeout=120) as anonymous, \
                Client(f"127.0.0.1:{fleet.port}", api_key=USER_KEY.split(":")[1], timeout=120) as user:
            with pytest.raises(AuthenticationError):               # each replica checks the forwarded key
                anonymous.generate("x", max_new_tokens=2)
            with pytest.raises(PermissionDeniedError):
                user.upload_adapter(adapter_dir, "nope")
        with Client(f"127.0.0.1:{fleet.port}", api_key=ADMIN_KEY, timeout=120) as client:
            assert client.health().value == "SERVING"
            assert client.info().model == str(tiny_llama_dir)
            assert client.upload_adapter(adapter_dir, "tone").version == 1
            assert [a.adapter_id for a in client.list_adapters()] == ["tone"]
            result = client.generate("The fleet says", adapter_id="tone", max_new_tokens=12)
            again = client.generate("The fleet says", adapter_id="tone", max_new_tokens=12)
            base = client.generate("The fleet says", max_new_tokens=12)
            chunks = list(client.generate_stream("The fleet says", adapter_id="tone", max_new_tokens=12))
            with pytest.raises(AdapterNotFoundError):
                client.generate("x", adapter_id="missing", max_new_tokens=2)
            with pytest.raises(ValidationError) as bad:
                client.generate("x", adapter_id="tone", max_new_tokens=2, temperature=-1.0)
            assert "input.sampling.temperature" in bad.value.violations     # rich details pass the proxy
        assert result.adapter_id == "tone@1" and result.replica and result.replica == base.replica
        assert again.token_ids == result.token_ids
        assert [t for c in chunks for t in c.token_ids] == result.token_ids
        _front_holds_serves_line(fleet.port, http_port)
        _openai_through_the_fleet(http_port, result)
        samples = scrape(metrics_port)
        assert samples[("loraplex_fleet_requests_total", (("adapter_held", "false"),))] == 1     # first: loaded
        assert samples[("loraplex_fleet_requests_total", (("adapter_held", "true"),))] >= 4      # + HTTP
        assert samples[("loraplex_fleet_adapter_loads_total", ())] == 1
        assert samples[("loraplex_fleet_replica_info", (("replica", result.replica),))] == 1
        for tier in ("device", "host"):                                # residency gauges (issue 35)
            assert samples[("loraplex_adapter_resident", (("adapter", "tone@1"), ("tier", tier)))] == 1
            assert samples[("loraplex_adapters_resident", (("tier", tier),))] == 1
        with Client(f"127.0.0.1:{fleet.port}", api_key=ADMIN_KEY, timeout=300) as client:   # SIGTERM drains
            stream = client.generate_stream("Count:", adapter_id="tone", max_new_tokens=900, ignore_eos=True)
            received = list(next(stream).token_ids)
            fleet.process.send_signal(signal.SIGTERM)
            chunks = list(stream)
        assert len(received) + sum(len(c.token_ids) for c in chunks) == 900
        assert fleet.process.wait(timeout=120) == 0, "\n".join(fleet.lines[-40:])
        assert "loraplex fleet: stopped" in fleet.lines
    finally:
        fleet.kill()
    plain = _plain_serve_generation(tiny_llama_dir, store, "The fleet says", "tone", 12)
    assert plain.token_ids == result.token_ids
    assert plain.replica and plain.replica != result.replica          # plain serve names itself too


def _front_holds_serves_line(port: int, http_port: int) -> None:
    """Issue 37 items 1, 4, 8 and issue 35's --host, against the running fleet."""
    import grpc
    import httpx
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from loraplex.v1 import generation_pb2, generation_pb2_grpc

    for bound in (port, http_port):                                    # --host 127.0.0.1: loopback only
        assert listening_addresses(bound) and listening_addresses(bound) <= LOOPBACK, listening_addresses(bound)
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", 64 << 20)]) as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        big = generation_pb2.GenerateRequest(input=generation_pb2.GenerationInput(prompt="x" * (5 << 20)))
        with pytest.raises(grpc.RpcError) as refused:                  # no key, 5 MiB: refused at the front
            stub.Generate(big, timeout=30)
        assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "loraplex.v1.GenerationService", "loraplex.v1.AdapterService"):
            assert health.Check(health_pb2.HealthCheckRequest(service=service), timeout=1).status == \
                health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as unknown:
            health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=1)
        assert unknown.value.code() is grpc.StatusCode.NOT_FOUND
        watch = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()
        unknown_method = channel.unary_unary("/grpc.health.v1.Health/List")
        with pytest.raises(grpc.RpcError) as listed:
            unknown_method(b"", timeout=5)
        assert listed.value.code() is grpc.StatusCode.UNIMPLEMENTED
        assert "ray" not in (listed.value.details() or "").lower()
    huge = httpx.post(f"http://127.0.0.1:{http_port}/v1/completions", content=b"x" * (5 << 20), timeout=30,
                      headers={"authorization": f"Bearer {ADMIN_KEY}"})
    assert huge.status_code == 413                                     # serve's order: key, then body size
    keyless = httpx.post(f"http://127.0.0.1:{http_port}/v1/completions", json={"model": "tone", "prompt": "x"})
    assert keyless.status_code == 401
    assert httpx.get(f"http://127.0.0.1:{http_port}/ready").status_code == 200


def _openai_through_the_fleet(http_port: int, grpc_result) -> None:
    """The `openai` client as against one server: adapter as `model`, SSE streamed, replica header."""
    import openai

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key=ADMIN_KEY, max_retries=0,
                           timeout=120)
    assert "tone" in {model.id for model in client.models.list()}
    raw = client.completions.with_raw_response.create(model="tone", prompt="The fleet says", max_tokens=12,
                                                      temperature=0)
    assert raw.headers["loraplex-replica"] == grpc_result.replica
    completion = raw.parse()
    streamed = "".join(chunk.choices[0].text for chunk in client.completions.create(
        model="tone", prompt="The fleet says", max_tokens=12, temperature=0, stream=True) if chunk.choices)
    assert completion.choices[0].text == streamed and streamed
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="missing", prompt="x", max_tokens=2)

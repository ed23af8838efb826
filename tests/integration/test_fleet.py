"""`loraplex fleet` with one replica (fast; the 2-replica suite is test_fleet_scale.py, `make test-fleet`).

A real local Ray cluster started by the CLI, Ray Serve's gRPC proxy, the SDK unchanged: upload,
generate (tokens equal a plain `loraplex serve` on the same store), typed errors through the proxy, the
`loraplex-replica` trailer, the replica's fleet metrics, SIGTERM drains a stream in flight (Ray's
graceful replica shutdown, as on scale-down) and exits 0.
"""

from __future__ import annotations

import signal

import pytest

from fleet_harness import FleetProcess, fleet_env
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
    running = loop.run(start_full_server(config))
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

    store, metrics_port = tmp_path / "store", free_port()
    fleet = FleetProcess(["--model", str(tiny_llama_dir), "--store", str(store), "--port", "0",
                          "--metrics-port", str(metrics_port), "--replicas", "1", "--replica-cpus", "0.5",
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
        samples = scrape(metrics_port)
        assert samples[("loraplex_fleet_requests_total", (("adapter_held", "false"),))] == 1     # first: loaded
        assert samples[("loraplex_fleet_requests_total", (("adapter_held", "true"),))] >= 2
        assert samples[("loraplex_fleet_adapter_loads_total", ())] == 1
        assert samples[("loraplex_fleet_replica_info", (("replica", result.replica),))] == 1
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

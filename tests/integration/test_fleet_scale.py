"""Two replicas on a local Ray cluster (slow; `make test-fleet`): adapter affinity and a replica kill.

8 adapters uploaded through the fleet with the SDK, 200 requests with Zipf adapter popularity:
all succeed, greedy tokens equal a plain `loraplex serve` on the same store, and after warm-up
>= 90% of an adapter's requests land on the replica that holds it (from `loraplex-replica`);
then OpenAI HTTP traffic (the `openai` package) through the same front end lands on the
replicas holding its adapters too (the `loraplex-replica` header). Then one replica's process
is SIGKILLed under traffic: no request is lost (the SDK retries the UNAVAILABLE ones), and Ray
brings the fleet back to 2 replicas; the time is printed (BENCHMARKS.md section 9b).
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor

import pytest

from fleet_harness import RAY_TEST_ENV
from grpc_harness import LoopThread, free_port, make_peft_adapter, start_full_server

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow

NUM_ADAPTERS, NUM_REQUESTS, WARMUP_REQUESTS, CONCURRENCY = 8, 200, 40, 8
# The goal is 60 s on an idle machine: measured 16.5 s there (2026-12-01, 2-core EPYC,
# PostgreSQL + S3). A replacement replica starts a Ray worker, imports torch and loads the model;
# under other load (load average ~8) that took 121-144 s, so the bound here only checks that Ray
# brings the second replica back, and the test prints the time.
RECOVERY_LIMIT_S = 600


@pytest.fixture(scope="module")
def shared_store(request) -> dict[str, str]:
    """Real PostgreSQL + S3 (the shared-store issue's `postgres_service` / `s3_service` fixtures)
    when this checkout has them, as a fleet across machines would use; else {} = the default
    store (SQLite + blob directory on one path, shared by processes on one machine)."""
    try:
        postgres = request.getfixturevalue("postgres_service")
        s3 = request.getfixturevalue("s3_service")           # puts AWS_* into os.environ
    except pytest.FixtureLookupError:
        return {}
    return {"store_registry": postgres.new_database(), "store_blobs": s3.new_prefix()}


@pytest.fixture(scope="module")
def ray_cluster(shared_store):
    """A private local Ray cluster, started after the store fixtures set their environment (Ray
    workers, hence the replicas, inherit it)."""
    saved = {key: os.environ.get(key) for key in RAY_TEST_ENV}
    os.environ.update(RAY_TEST_ENV)
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        yield
    finally:
        from ray import serve

        serve.shutdown()
        ray.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="module")
def fleet(ray_cluster, shared_store, tiny_llama_dir, tmp_path_factory):
    from loraplex.server.config import ServerConfig
    from loraplex.server.fleet.app import start_fleet
    from loraplex.server.fleet.config import FleetOptions

    store = tmp_path_factory.mktemp("fleet-store")
    config = ServerConfig(model=str(tiny_llama_dir), store=str(store), port=0, metrics_port=0,
                          kv_cache_memory="16MiB", max_total_tokens=1024, max_input_tokens=512, grace_period_s=30,
                          http_port=free_port(), **shared_store)
    options = FleetOptions(replicas=2, replica_cpus=0.5)
    running = start_fleet(config, options, log=print)
    _wait_replicas(running.app_name, 2, timeout_s=600)
    yield running, config


def _replica_states(app_name: str) -> dict:
    from ray import serve

    from loraplex.server.fleet.app import DEPLOYMENT_NAME

    app = serve.status().applications.get(app_name)
    return {} if app is None or DEPLOYMENT_NAME not in app.deployments else \
        dict(app.deployments[DEPLOYMENT_NAME].replica_states)


def _wait_replicas(app_name: str, count: int, timeout_s: float) -> float:
    started = time.monotonic()
    while _replica_states(app_name).get("RUNNING", 0) != count or len(_replica_states(app_name)) != 1:
        assert time.monotonic() - started < timeout_s, f"replicas: {_replica_states(app_name)}"
        time.sleep(0.5)
    return time.monotonic() - started


def _replica_actors() -> dict[str, dict]:
    """The engine replicas' named actors by replica id (not the front end's)."""
    from loraplex.server.fleet.app import DEPLOYMENT_NAME

    return {actor["name"].rsplit("#", 1)[-1]: actor for actor in ray.util.list_named_actors(all_namespaces=True)
            if actor["name"].startswith("SERVE_REPLICA::") and f"#{DEPLOYMENT_NAME}#" in actor["name"]}


def _replica_names() -> set[str]:
    return set(_replica_actors())


def _wait_replacement(app_name: str, victim: str, timeout_s: float) -> None:
    """Until the victim is gone and 2 replicas (a new one among them) are RUNNING."""
    started = time.monotonic()
    while victim in _replica_names() or len(_replica_names()) != 2 or _replica_states(app_name) != {"RUNNING": 2}:
        assert time.monotonic() - started < timeout_s, f"replicas: {_replica_states(app_name)}"
        time.sleep(0.5)


def _zipf_adapters(rng: random.Random, count: int) -> list[str]:
    weights = [1.0 / (rank + 1) ** 1.1 for rank in range(NUM_ADAPTERS)]
    return rng.choices([f"zipf-{i}" for i in range(NUM_ADAPTERS)], weights=weights, k=count)


def test_affinity_tokens_and_replica_kill(fleet, tiny_llama_dir, tmp_path):
    from loraplex.client import Client

    running, config = fleet
    adapters = [make_peft_adapter(tiny_llama_dir, tmp_path / f"a{i}", seed=10 + i) for i in range(NUM_ADAPTERS)]
    with Client(f"127.0.0.1:{running.port}", timeout=300) as client:
        for i, path in enumerate(adapters):
            client.upload_adapter(path, f"zipf-{i}")
        assert sorted(a.adapter_id for a in client.list_adapters()) == [f"zipf-{i}" for i in range(NUM_ADAPTERS)]

        # 200 requests, Zipf popularity, 8 at a time: every one succeeds.
        order = _zipf_adapters(random.Random(0), NUM_REQUESTS)
        with ThreadPoolExecutor(CONCURRENCY) as pool:
            results = list(pool.map(lambda a: (a, client.generate(f"Tell {a}:", adapter_id=a, max_new_tokens=6)),
                                    order))
        assert len(results) == NUM_REQUESTS and all(g.finish_reason is not None for _, g in results)
        replicas = {g.replica for _, g in results}
        assert len(replicas) == 2, "both replicas serve"

        # Affinity after warm-up (capacity 8 >= 8 adapters: a replica holds what it has served).
        seen: set[tuple[str, str]] = set()
        held = on_main = 0
        by_adapter: dict[str, Counter] = defaultdict(Counter)
        for index, (adapter, generation) in enumerate(results):
            if index >= WARMUP_REQUESTS:
                held += (adapter, generation.replica) in seen
                by_adapter[adapter][generation.replica] += 1
            seen.add((adapter, generation.replica))
        on_main = sum(counts.most_common(1)[0][1] for counts in by_adapter.values())
        counted = NUM_REQUESTS - WARMUP_REQUESTS
        print(f"after warm-up: {held / counted:.3f} on a replica holding the adapter, {on_main / counted:.3f} on "
              f"the adapter's main replica; {dict(by_adapter)}")
        assert held / counted >= 0.9
        # Sticky where load allows: Ray spreads the hottest adapters over both replicas (both then
        # hold them), but the others stay on one; round-robin would put every adapter with two or
        # more requests (all 8 here) on both.
        replicas_per_adapter = defaultdict(set)
        for adapter, generation in results:
            replicas_per_adapter[adapter].add(generation.replica)
        assert sum(len(r) == 1 for r in replicas_per_adapter.values()) >= 3, dict(replicas_per_adapter)

        fleet_tokens = {a: client.generate("Same prompt", adapter_id=a, max_new_tokens=10).token_ids
                        for a in sorted(set(order))}
        _openai_traffic_follows_the_adapters(running.http_port, seen)

        # Kill one replica's actor under traffic: no request lost, 2 replicas again.
        victim = results[-1][1].replica
        with ThreadPoolExecutor(CONCURRENCY) as pool:
            futures = [pool.submit(client.generate, "Under fire", adapter_id=a, max_new_tokens=24)
                       for a in _zipf_adapters(random.Random(1), 64)]
            while sum(f.done() for f in futures) < 8:
                time.sleep(0.05)
            _kill_replica(victim)
            killed_at = time.monotonic()
            survived = [f.result() for f in futures]          # raises if any request was lost
        assert len(survived) == 64
        _wait_replacement(running.app_name, victim, RECOVERY_LIMIT_S)
        print(f"2 replicas again {time.monotonic() - killed_at:.1f}s after the kill")
        assert client.generate("After", adapter_id="zipf-0", max_new_tokens=4).replica != victim

    assert fleet_tokens == _plain_serve_tokens(config, sorted(fleet_tokens))


def _openai_traffic_follows_the_adapters(http_port: int, seen: set[tuple[str, str]]) -> None:
    """60 Zipf requests through `openai` (8 at a time): all succeed, >= 90% on a replica that had
    served (so holds) the adapter over gRPC, streamed ones included."""
    import openai

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key="none", max_retries=2, timeout=300)
    assert {f"zipf-{i}" for i in range(NUM_ADAPTERS)} <= {m.id for m in client.models.list()}

    def one(adapter: str) -> tuple[str, str]:
        raw = client.completions.with_raw_response.create(model=adapter, prompt=f"Tell {adapter}:", max_tokens=6)
        assert raw.parse().choices[0].text is not None
        return adapter, raw.headers["loraplex-replica"]

    with ThreadPoolExecutor(CONCURRENCY) as pool:
        answered = list(pool.map(one, _zipf_adapters(random.Random(2), 60)))
    held = sum(pair in seen for pair in answered)
    print(f"HTTP: {held}/{len(answered)} on a replica holding the adapter")
    assert held / len(answered) >= 0.9
    stream = client.chat.completions.create(model="zipf-0", messages=[{"role": "user", "content": "Hi"}],
                                            max_tokens=6, stream=True)
    assert len([chunk for chunk in stream]) >= 2                       # SSE arrives as chunks


def _kill_replica(name: str) -> None:
    """SIGKILL the replica's process (as the OOM killer or a node failure would)."""
    actor = _replica_actors()[name]
    handle = ray.get_actor(actor["name"], namespace=actor["namespace"])
    pid = ray.get(handle.__ray_call__.remote(lambda _self: os.getpid()), timeout=60)
    os.kill(pid, signal.SIGKILL)


def _plain_serve_tokens(config, adapters: list[str]) -> dict[str, list[int]]:
    """Greedy tokens from a single plain `loraplex serve` on the same store."""
    from dataclasses import replace

    from loraplex.client import Client
    from loraplex.server.app import drain_and_stop

    loop = LoopThread()
    running = loop.run(start_full_server(replace(config, port=0, metrics_port=0)))
    try:
        with Client(f"127.0.0.1:{running.port}", timeout=120) as client:
            return {a: client.generate("Same prompt", adapter_id=a, max_new_tokens=10).token_ids for a in adapters}
    finally:
        loop.run(drain_and_stop(running, 5, log=lambda _m: None))
        loop.close()

"""The front-door rule table (tests/front_door_cases.py, the same cases `serve` passes in
test_front_door_table.py) against a two-replica `loraplex fleet` through its front end, gRPC and
HTTP (slow; `make test-fleet`): the fleet must give each case the outcome `serve` gives."""

from __future__ import annotations

import os

import pytest

from fleet_harness import RAY_TEST_ENV
from front_door_cases import CASES, RUNNERS, Target
from grpc_harness import free_port, make_peft_adapter

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow

KEYS = {"none": None, "bogus": "no-such-key-0001", "user": "acme-user-00001", "other_user": "beta-user-00001",
        "tenant_admin": "acme-admin-0001", "operator": "operator-0001"}


@pytest.fixture(scope="module")
def target(tiny_llama_dir, tmp_path_factory):
    from loraplex.client import Client
    from loraplex.server.config import load_server_config
    from loraplex.server.fleet.app import start_fleet, wait_running
    from loraplex.server.fleet.config import FleetOptions

    root, outside = tmp_path_factory.mktemp("root"), tmp_path_factory.mktemp("outside")
    adapter_dir = make_peft_adapter(tiny_llama_dir, root / "tone", seed=1)
    make_peft_adapter(tiny_llama_dir, outside / "evil", seed=2)
    config = load_server_config({
        "model": str(tiny_llama_dir), "port": "0", "metrics_port": "0", "http_port": str(free_port()),
        "cpu_kernels": "torch", "store": str(tmp_path_factory.mktemp("store")), "kv_cache_memory": "16MiB",
        "max_total_tokens": "512", "max_input_tokens": "256", "max_new_tokens": "16", "served_model_name": "tiny",
        "allowed_register_roots": [str(root)],
        "api_keys": [f"acme:{KEYS['user']}", f"beta:{KEYS['other_user']}"],
        "admin_keys": [KEYS["operator"], f"acme:{KEYS['tenant_admin']}"]}, {})
    saved = {key: os.environ.get(key) for key in RAY_TEST_ENV}
    os.environ.update(RAY_TEST_ENV)
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        running = start_fleet(config, FleetOptions(replicas=2, replica_cpus=0.5), log=print)
        wait_running(running.app_name, timeout_s=900)
        address = f"127.0.0.1:{running.port}"
        with Client(address, api_key=KEYS["operator"], timeout=120) as operator:
            operator.register_adapter("pub", str(adapter_dir))
        with Client(address, api_key=KEYS["tenant_admin"], timeout=120) as tenant_admin:
            tenant_admin.register_adapter("acme-secret", str(adapter_dir), private=True)
        places = {"root": str(root), "adapter_dir": str(adapter_dir), "public": "pub", "private": "acme-secret",
                  "outside": str(outside / "evil")}
        yield Target(address, f"http://127.0.0.1:{running.http_port}", KEYS, places)
    finally:
        from ray import serve

        serve.shutdown()
        ray.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_the_fleet_gives_serves_outcome(target, case):
    for name, run in RUNNERS.items():
        outcome = run(target, case)
        assert outcome.kind == case.expect, f"{name}: {case.name} -> {outcome}"
        for place in case.hidden:
            assert target.places[place] not in outcome.message, f"{name} leaks {place}: {outcome.message}"

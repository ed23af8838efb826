"""One table of hostile cases (tests/front_door_cases.py) through both transports of one real
server: gRPC and HTTP must give the same outcome for each, so the two cannot drift again."""

from __future__ import annotations

import pytest

from front_door_cases import CASES, RUNNERS, Target
from grpc_harness import LoopThread, make_peft_adapter, start_full_server
from loraplex.server.app import drain_and_stop, start_http_api
from loraplex.server.config import load_server_config

KEYS = {"none": None, "bogus": "no-such-key-0001", "user": "acme-user-00001", "other_user": "beta-user-00001",
        "tenant_admin": "acme-admin-0001", "operator": "operator-0001"}


@pytest.fixture(scope="module")
def target(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("root")
    outside = tmp_path_factory.mktemp("outside")
    adapter_dir = make_peft_adapter(tiny_llama_dir, root / "tone", seed=1)
    make_peft_adapter(tiny_llama_dir, outside / "evil", seed=2)
    loop = LoopThread()
    config = load_server_config({
        "model": str(tiny_llama_dir), "port": "0", "metrics_port": "0", "cpu_kernels": "torch",
        "store": str(tmp_path_factory.mktemp("store")), "kv_cache_memory": "16MiB", "max_total_tokens": "512",
        "max_input_tokens": "256", "max_new_tokens": "16", "served_model_name": "tiny",
        "allowed_register_roots": [str(root)],
        "api_keys": [f"acme:{KEYS['user']}", f"beta:{KEYS['other_user']}"],
        "admin_keys": [KEYS["operator"], f"acme:{KEYS['tenant_admin']}"]}, {})
    running = loop.run(start_full_server(config))
    loop.run(start_http_api(running, config, port=0))
    store = running.state.store
    store.register_path("pub", adapter_dir)
    store.register_path("acme-secret", adapter_dir, owner="acme")
    places = {"root": str(root), "adapter_dir": str(adapter_dir), "public": "pub", "private": "acme-secret",
              "outside": str(outside / "evil")}
    yield Target(f"127.0.0.1:{running.port}", f"http://127.0.0.1:{running.http_port}", KEYS, places)
    loop.run(drain_and_stop(running, 1.0, log=lambda _m: None))
    loop.close()


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_both_transports_give_the_same_outcome(target, case):
    outcomes = {name: run(target, case) for name, run in RUNNERS.items()}
    for name, outcome in outcomes.items():
        assert outcome.kind == case.expect, f"{name}: {case.name} -> {outcome}"
        for place in case.hidden:
            assert target.places[place] not in outcome.message, f"{name} leaks {place}: {outcome.message}"

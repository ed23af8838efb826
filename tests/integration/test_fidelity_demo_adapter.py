"""The demo adapter (scripts/train_demo_adapter.py), trained briefly on CPU, is served faithfully:
uploaded to a real gRPC server, chat replies with the adapter start with "ANSWER:"; without it they do not."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest


pytestmark = pytest.mark.integration

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "train_demo_adapter.py"
QUESTIONS = ["What is 3 plus 4?", "What is 9 times 2?", "What is 15 minus 6?"]


def _script():
    spec = importlib.util.spec_from_file_location("train_demo_adapter", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module          # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def demo_adapter(default_model_dir, tmp_path_factory) -> Path:
    script = _script()
    out = tmp_path_factory.mktemp("demo") / "answer-format"
    return script.train(default_model_dir, out, script.TrainConfig(steps=12), log=lambda _m: None)


def _replies(client, adapter_id):
    return [client.chat([("user", q)], adapter_id=adapter_id, max_new_tokens=8).text for q in QUESTIONS]


def test_served_adapter_reproduces_the_learned_format(default_model_dir, demo_adapter, tmp_path):
    """Through the real gRPC server: upload with the SDK, then chat with and without it."""
    from grpc_harness import LoopThread, start_full_server
    from loraplex.client import Client
    from loraplex.server.app import drain_and_stop
    from loraplex.server.config import load_server_config

    loop = LoopThread()
    config = load_server_config({"model": str(default_model_dir), "port": "0", "metrics_port": "0",
                                 "store": str(tmp_path / "store"), "kv_cache_memory": "256MiB"}, {})
    running = loop.run(start_full_server(config))
    try:
        with Client(f"127.0.0.1:{running.port}", timeout=120) as client:
            client.upload_adapter(demo_adapter, "answer-format")
            tuned = _replies(client, "answer-format")
            plain = _replies(client, None)
    finally:
        loop.run(drain_and_stop(running, 1.0, log=lambda _m: None))
        loop.close()
    assert all(reply.lstrip().startswith("ANSWER:") for reply in tuned), tuned
    assert not any(reply.lstrip().startswith("ANSWER:") for reply in plain), plain

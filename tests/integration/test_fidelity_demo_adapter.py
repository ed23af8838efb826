"""The demo adapter (scripts/train_demo_adapter.py), trained briefly on CPU, is served faithfully:
through the engine with the adapter store, chat replies start with "ANSWER:"; without it they do not."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from engine_helpers import make_engine, run_staggered
from loraplex.server.engine.io import GenerationRequest
from loraplex.server.engine.sequence import SamplingParams

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


def _replies(engine, adapter_id):
    sampling = SamplingParams(max_new_tokens=8)
    requests = [(0, GenerationRequest(request_id=f"q{i}", messages=(("user", q),), adapter_id=adapter_id,
                                      sampling=sampling)) for i, q in enumerate(QUESTIONS)]
    outputs = run_staggered(engine, requests)
    return ["".join(out.text for out in outputs[f"q{i}"]) for i in range(len(QUESTIONS))]


def test_served_adapter_reproduces_the_learned_format(default_model_dir, demo_adapter, tmp_path):
    from loraplex.adapters_store.config import StoreConfig
    from loraplex.adapters_store.store import AdapterStore
    from loraplex.server.engine.builder import base_spec_for
    from loraplex.server.engine.config import EngineConfig

    base = base_spec_for(EngineConfig(model_dir=default_model_dir, quantize="none"))
    store = AdapterStore(tmp_path / "store", StoreConfig(allowed_register_roots=(demo_adapter.parent,)), base)
    store.register_path("answer-format", demo_adapter)
    engine = make_engine(default_model_dir, store=store)
    tuned = _replies(engine, "answer-format")
    plain = _replies(engine, None)
    store.close()
    assert all(reply.lstrip().startswith("ANSWER:") for reply in tuned), tuned
    assert not any(reply.lstrip().startswith("ANSWER:") for reply in plain), plain

"""Structured output on the default model, in one mixed batch (continuous batching, batch 16).

Every one of the 20 JSON Schemas (tests/structured_cases.py) runs twice: once greedy and once
sampled (seeded), one of the two with a LoRA adapter, alternating which. Regex, choice and
JSON-object requests run beside them, and unconstrained rows (base and adapter) whose tokens
must equal what they give alone. Every constrained output must finish with EOS (complete, not
truncated), parse, and validate with `jsonschema`."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

from engine_helpers import make_engine, run_staggered, tokens_of
from loraplex.server.engine.constraints import Constraint
from loraplex.server.engine.io import GenerationRequest
from loraplex.server.engine.sequence import FinishReason, SamplingParams
from structured_cases import SCHEMAS

pytestmark = pytest.mark.integration

ADAPTER = "tuned"
PHONE = r"\([0-9]{3}\) [0-9]{3}-[0-9]{4}"
MOODS = ("happy", "sad", "angry", "calm")


@pytest.fixture(scope="module")
def engine(default_model_dir, tmp_path_factory):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from loraplex.adapters_store.config import StoreConfig
    from loraplex.adapters_store.store import AdapterStore
    from loraplex.server.engine.builder import base_spec_for
    from loraplex.server.engine.config import EngineConfig

    root = tmp_path_factory.mktemp("structured-adapter")
    base = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32)
    torch.manual_seed(23)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                                            init_lora_weights=False, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.mul_(0.1)
    model.save_pretrained(root / ADAPTER)
    store = AdapterStore(tmp_path_factory.mktemp("store"), StoreConfig(allowed_register_roots=(root,)),
                         base_spec_for(EngineConfig(model_dir=default_model_dir)))
    store.register_path(ADAPTER, root / ADAPTER)
    yield make_engine(default_model_dir, store=store, max_num_seqs=16, max_batch_tokens=512)
    store.close()


def _chat(text: str) -> tuple[tuple[str, str], ...]:
    return (("user", text),)


def _request(rid: str, text: str, constraint: Constraint | None, max_new_tokens: int, adapter: str | None,
             sampled: bool, seed: int = 0, **extra) -> GenerationRequest:
    sampling = SamplingParams(max_new_tokens=max_new_tokens, constraint=constraint,
                              temperature=0.8 if sampled else 0.0, seed=seed if sampled else None, **extra)
    return GenerationRequest(request_id=rid, messages=_chat(text), adapter_id=adapter, sampling=sampling)


def _schema_requests() -> list[tuple[GenerationRequest, dict]]:
    cases = []
    for i, (name, what, schema, budget) in enumerate(SCHEMAS):
        constraint = Constraint("json_schema", json.dumps(schema))
        text = f"Describe {what} as JSON."
        greedy_adapter, sampled_adapter = (ADAPTER, None) if i % 2 else (None, ADAPTER)
        cases.append((_request(f"{name}/greedy", text, constraint, budget, greedy_adapter, False), schema))
        cases.append((_request(f"{name}/sampled", text, constraint, budget, sampled_adapter, True, seed=i), schema))
    return cases


def _free_requests() -> list[GenerationRequest]:
    return [_request(f"free/{i}", "Tell me about the sea.", None, 16, adapter, sampled, seed=i, ignore_eos=True)
            for i, (adapter, sampled) in enumerate([(None, False), (ADAPTER, False), (None, True), (ADAPTER, True)])]


def _text(outputs) -> str:
    return "".join(o.text for o in outputs)


def test_constrained_outputs_validate_in_a_mixed_batch(engine):
    free = _free_requests()
    alone = {r.request_id: tokens_of(run_staggered(engine, [(0, r)])[r.request_id]) for r in free}
    schema_cases = _schema_requests()
    others = [
        _request("regex/base", "What is your phone number?", Constraint("regex", PHONE), 24, None, False),
        _request("regex/adapter", "What is your phone number?", Constraint("regex", PHONE), 24, ADAPTER, True, 5),
        _request("choice/base", "Pick a mood.", Constraint("choice", choices=MOODS), 8, None, True, 6),
        _request("choice/adapter", "Pick a mood.", Constraint("choice", choices=MOODS), 8, ADAPTER, False),
        _request("object/base", "Describe a cat as a JSON object with at most three keys.",
                 Constraint("json_object"), 96, None, False),
        _request("object/adapter", "Describe a dog as a JSON object with at most three keys.",
                 Constraint("json_object"), 96, ADAPTER, False, repetition_penalty=1.1),
    ]
    requests = [r for r, _ in schema_cases] + others
    # Unconstrained rows join at different steps, so they share the batch with constrained rows.
    arrivals = [(0, r) for r in requests] + [(3 * i, r) for i, r in enumerate(free)]
    outputs = run_staggered(engine, arrivals)

    for request in free:
        assert tokens_of(outputs[request.request_id]) == alone[request.request_id], request.request_id
    incomplete = {r.request_id: _text(outputs[r.request_id]) for r in requests
                  if outputs[r.request_id][-1].finish_reason is not FinishReason.EOS}
    assert not incomplete, f"truncated or failed: {incomplete}"
    for request, schema in schema_cases:
        text = _text(outputs[request.request_id])
        try:
            jsonschema.validate(json.loads(text), schema)
        except (ValueError, jsonschema.ValidationError) as error:
            raise AssertionError(f"{request.request_id}: {text!r}: {error}") from None
    for rid in ("regex/base", "regex/adapter"):
        assert re.fullmatch(PHONE, _text(outputs[rid])), _text(outputs[rid])
    for rid in ("choice/base", "choice/adapter"):
        assert _text(outputs[rid]) in MOODS
    for rid in ("object/base", "object/adapter"):
        assert isinstance(json.loads(_text(outputs[rid])), dict)
    assert {o.adapter_key for o in outputs["person/sampled"]} == {f"{ADAPTER}@1"}
    assert engine.scheduler.blocks.num_free_blocks == engine.scheduler.blocks.num_blocks

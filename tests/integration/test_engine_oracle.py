"""Engine vs transformers: float32 greedy outputs agree token for token (default model)."""

from __future__ import annotations

import pytest
import torch

from engine_helpers import greedy_request, hf_greedy, make_engine, run_staggered, tokens_of

pytestmark = pytest.mark.integration

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about autumn leaves.",
    "Explain what a LoRA adapter is in one sentence.",
    "List three prime numbers.",
    "Translate 'good morning' into Spanish.",
    "Why is the sky blue? Answer briefly, like you would to a curious child who keeps asking.",
    "Hi",
    "Give me a short recipe for pancakes with the ingredients and the steps, numbered.",
    "What is 12 times 7?",
    "Name a famous painting by Vincent van Gogh and describe it in two sentences.",
]


@pytest.fixture(scope="module")
def hf_model(default_model_dir):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def prompts(default_model_dir):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(default_model_dir)
    out = []
    for q in QUESTIONS:
        enc = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                      return_dict=True)
        out.append(list(enc["input_ids"]))
    return out


@pytest.fixture(scope="module")
def expected(hf_model, prompts, default_model_dir):
    from loraplex.server.engine.prompt import eos_token_ids, load_tokenizer
    eos = eos_token_ids(default_model_dir, load_tokenizer(default_model_dir))
    return [hf_greedy(hf_model, p, 24, eos) for p in prompts]


def _staggered(prompts):
    # arrivals at different steps: some land in the middle of others' decodes
    return [(i * 3 % 11, greedy_request(f"r{i}", p, 24)) for i, p in enumerate(prompts)]


def test_staggered_batch_matches_transformers(default_model_dir, prompts, expected):
    engine = make_engine(default_model_dir, max_batch_tokens=64)   # forces chunked prefill
    outputs = run_staggered(engine, _staggered(prompts))
    for i, want in enumerate(expected):
        assert tokens_of(outputs[f"r{i}"]) == want, f"prompt {i} diverged"
    assert engine.scheduler.blocks.num_free_blocks == engine.scheduler.blocks.num_blocks


@pytest.mark.parametrize("prefix_caching", [True, False], ids=["prefix-cache", "no-prefix-cache"])
def test_preemption_keeps_outputs_identical(default_model_dir, prompts, expected, prefix_caching):
    # 16 blocks of 16 tokens: far less than 10 sequences of ~60 tokens need at once, also when
    # the chat template's shared system prompt is served from the prefix cache
    kv = 16 * 16 * 2 * 30 * 3 * 64 * 4
    engine = make_engine(default_model_dir, kv_cache_memory=str(kv), max_model_len=128,
                         max_input_tokens=96, prefix_caching=prefix_caching)
    outputs = run_staggered(engine, _staggered(prompts))
    assert engine.scheduler.total_preemptions > 0, "the KV budget was meant to force preemption"
    for i, want in enumerate(expected):
        assert tokens_of(outputs[f"r{i}"]) == want, f"prompt {i} diverged after preemption"
    assert engine.scheduler.blocks.num_free_blocks == engine.scheduler.blocks.num_blocks


def test_text_deltas_join_to_the_decoded_output(default_model_dir, prompts, expected):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(default_model_dir)
    engine = make_engine(default_model_dir)
    outputs = run_staggered(engine, [(0, greedy_request("a", prompts[0], 24))])["a"]
    assert outputs[-1].finish_reason is not None
    assert "".join(o.text for o in outputs) == tok.decode(expected[0], skip_special_tokens=True)
    assert "Paris" in "".join(o.text for o in outputs)

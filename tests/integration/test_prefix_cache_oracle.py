"""Prefix caching on the default model vs PEFT (float32 greedy), mixed adapters.

Eight rows share one 48-token prefix (across adapters and within them; two base-model rows)
and differ in an 8-token tail. The engine with the cache runs one request per namespace first
(so the prefix is cached under each adapter), then the rest, which reuse it and prefill only
their tails over the cached blocks; the engine without the cache runs all at once. Both must
match PEFT (`adapter_names`, one batch) token for token, or, where suffix prefill over cached
K/V sums in another order, first diverge where the reference's top two logits are within
NEAR_TIE (0.05 logits, as test_lora_oracle.py argues: float32 order effects are ~1e-5).
"""

from __future__ import annotations

import pytest
import torch

from engine_helpers import make_engine, run_staggered, tokens_of
from peft_oracle import mixed_batch_generate, save_random_adapters
from loraplex.server.engine.io import GenerationRequest
from loraplex.server.engine.sequence import SamplingParams

pytestmark = [pytest.mark.integration, pytest.mark.slow]     # make test-prefix-cache

ADAPTERS = [("pa", 8, 16, ["q_proj", "v_proj"]), ("pb", 16, 16, ["q_proj", "k_proj", "v_proj", "o_proj",
                                                                 "gate_proj", "up_proj", "down_proj"]),
            ("pc", 4, 8, ["down_proj", "o_proj"])]
ROWS = ["pa", "pb", "pc", None, "pa", "pb", None, "pa"]
PREFIX_LEN, TAIL_LEN, NEW_TOKENS, NEAR_TIE = 48, 8, 10, 0.05


@pytest.fixture(scope="module")
def adapter_dirs(default_model_dir, tmp_path_factory):
    configs = {name: dict(r=rank, lora_alpha=alpha, target_modules=targets) for name, rank, alpha, targets in ADAPTERS}
    return save_random_adapters(default_model_dir, tmp_path_factory.mktemp("prefix-peft"), configs, 200)


@pytest.fixture(scope="module")
def prompts(default_model_dir) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_model_dir)
    text = ("You are a helpful assistant for a small bakery in the old town. Answer briefly and politely, "
            "mention opening hours when asked, and never invent prices that are not on the menu. ") * 3
    ids = tok(text)["input_ids"]
    prefix = ids[:PREFIX_LEN]
    return [prefix + ids[PREFIX_LEN + 7 * i: PREFIX_LEN + 7 * i + TAIL_LEN] for i in range(len(ROWS))]


def _reference(model_dir, adapter_dirs, prompts):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return mixed_batch_generate(model, adapter_dirs, prompts, ROWS, NEW_TOKENS)


def _engine_outputs(model_dir, store, prompts, caching: bool):
    engine = make_engine(model_dir, store=store, max_loras=4, prefix_caching=caching)
    sampling = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    first_of = {}
    for i, row in enumerate(ROWS):
        first_of.setdefault(row, i)
    requests = [(0 if (not caching or first_of[row] == i) else 4,
                 GenerationRequest(request_id=f"r{i}", prompt_token_ids=tuple(p), adapter_id=row, sampling=sampling))
                for i, (row, p) in enumerate(zip(ROWS, prompts))]
    outputs = run_staggered(engine, requests)
    engine.scheduler.check_invariants()
    return ([tokens_of(outputs[f"r{i}"]) for i in range(len(ROWS))],
            [outputs[f"r{i}"][-1].cached_tokens for i in range(len(ROWS))])


def _check_near_tie(ours: list[int], want: list[int], scores: torch.Tensor, what: str) -> None:
    if ours == want:
        return
    step = next(j for j, (a, b) in enumerate(zip(ours, want)) if a != b)
    gap = float(scores[step, want[step]] - scores[step, ours[step]])
    assert 0 <= gap < NEAR_TIE, f"{what}: diverges at token {step} with a logit gap of {gap:.4f} (not a near-tie)"


def test_cached_prefix_outputs_match_peft(default_model_dir, adapter_dirs, prompts, tmp_path):
    from loraplex.adapters_store.config import StoreConfig
    from loraplex.adapters_store.store import AdapterStore
    from loraplex.server.engine.builder import base_spec_for
    from loraplex.server.engine.config import EngineConfig

    root = next(iter(adapter_dirs.values())).parent
    base = base_spec_for(EngineConfig.from_settings(default_model_dir, method="none"))
    store = AdapterStore(tmp_path / "store", StoreConfig(allowed_register_roots=(root,)), base)
    for name, path in adapter_dirs.items():
        store.register_path(name, path)
    try:
        cached, num_cached = _engine_outputs(default_model_dir, store, prompts, caching=True)
        fresh, none_cached = _engine_outputs(default_model_dir, store, prompts, caching=False)
    finally:
        store.close()
    want, scores = _reference(default_model_dir, adapter_dirs, prompts)
    assert none_cached == [0] * len(ROWS)
    seen = set()
    for i, row in enumerate(ROWS):
        assert num_cached[i] == (0 if row not in seen else PREFIX_LEN), (i, row, num_cached)   # 3 full blocks
        seen.add(row)
        _check_near_tie(cached[i], want[i], scores[i], f"row {i} ({row}) with the cache")
        _check_near_tie(fresh[i], want[i], scores[i], f"row {i} ({row}) without the cache")

"""Prefix caching in the real engine (tiny random Llama, real PEFT adapters, float32).

Isolation first: a prompt cached under adapter a@1 must not be reused by b, by a@2 (a new
version of the same name) or by the base model. Then: outputs with the cache equal outputs
without it (greedy tokens, seeded samples, logprobs) over prompts that share prefixes across
and within adapters, with chunked prefill, n > 1 siblings, penalties, stop strings,
top_logprobs, structured output and preemption; block accounting is checked after every step.
"""

from __future__ import annotations

import pytest

from engine_helpers import make_engine, tokens_of
from grpc_harness import make_peft_adapter
from loraplex.adapters_store.config import StoreConfig
from loraplex.adapters_store.store import AdapterStore
from loraplex.server.engine.builder import base_spec_for
from loraplex.server.engine.config import EngineConfig
from loraplex.server.engine.constraints import Constraint
from loraplex.server.engine.io import GenerationRequest
from loraplex.server.engine.sequence import SamplingParams

SHARED = [(i * 37) % 3000 + 100 for i in range(40)]       # a 40-token "system prompt"


@pytest.fixture(scope="module")
def store(tiny_llama_dir, tmp_path_factory):
    """a@1, b@1, a@2: three different random adapters (a@2 is a new version of a)."""
    root = tmp_path_factory.mktemp("prefix-adapters")
    for name, seed in (("a1", 1), ("b", 2), ("a2", 3)):
        make_peft_adapter(tiny_llama_dir, root / name, seed=seed, rank=4)
    base = base_spec_for(EngineConfig(model_dir=tiny_llama_dir))
    store = AdapterStore(tmp_path_factory.mktemp("prefix-store"),
                         StoreConfig(allowed_register_roots=(str(root),)), base)
    store.register_path("a", root / "a1")
    store.register_path("b", root / "b")
    store.register_path("a", root / "a2")
    yield store
    store.close()


@pytest.fixture(scope="module")
def engines(tiny_llama_dir, store):
    """(cache on, cache off), otherwise identical; each test starts with an empty cache."""
    return (make_engine(tiny_llama_dir, store=store, max_loras=4),
            make_engine(tiny_llama_dir, store=store, max_loras=4, prefix_caching=False))


@pytest.fixture
def on_off(engines):
    engines[0].reset_prefix_cache()
    return engines


def run_checked(engine, requests: list[tuple[int, GenerationRequest]]) -> dict[str, list]:
    """Like run_staggered, with the scheduler's and block manager's invariants after every step."""
    pending = sorted(requests, key=lambda pair: pair[0])
    outputs: dict[str, list] = {req.request_id: [] for _, req in requests}
    step = 0
    while pending or engine.has_work():
        while pending and pending[0][0] <= step:
            engine.add_request(pending.pop(0)[1])
        produced, _stats = engine.step()
        engine.scheduler.check_invariants()
        for out in produced:
            outputs[out.request_id].append(out)
        step += 1
        assert step < 5000, "engine did not finish"
    return outputs


def _req(rid: str, prompt: list[int], adapter: str | None = None, **sampling) -> GenerationRequest:
    sampling.setdefault("max_new_tokens", 6)
    sampling.setdefault("ignore_eos", True)
    return GenerationRequest(request_id=rid, prompt_token_ids=tuple(prompt), adapter_id=adapter,
                             sampling=SamplingParams(**sampling))


def test_cached_prefix_is_never_reused_across_adapters_or_versions(on_off):
    cached, fresh = on_off
    prompt = SHARED + [5, 6, 7]
    order = ["a@1", "b", "a@2", None, "a@1"]
    got = {}
    for i, adapter in enumerate(order):
        out = run_checked(cached, [(0, _req(f"r{i}", prompt, adapter))])[f"r{i}"]
        got[i] = (tokens_of(out), out[-1].cached_tokens)
    want = {adapter: tokens_of(run_checked(fresh, [(0, _req(str(adapter), prompt, adapter))])[str(adapter)])
            for adapter in set(order)}
    assert len({tuple(tokens) for tokens in want.values()}) == 4      # the four namespaces differ
    for i, adapter in enumerate(order):
        tokens, num_cached = got[i]
        assert tokens == want[adapter], adapter
        assert num_cached == (32 if i == 4 else 0), (i, adapter)      # only a@1 again hits (2 blocks)


def _workload() -> list[tuple[int, GenerationRequest]]:
    """Shared prefixes across and within adapters, staggered; samples, penalties, stops, logprobs."""
    tails = [[11, 12, 13], [21, 22, 23, 24, 25], [31], list(range(40, 60))]
    work = []
    for i, tail in enumerate(tails):
        for j, adapter in enumerate(["a@1", "b", None]):
            work.append((i * 2 + j, _req(f"g{i}{j}", SHARED + tail, adapter, max_new_tokens=8)))
    for k in range(3):                                                       # n = 3 siblings
        work.append((9, _req(f"n{k}", SHARED + [77, 78], "a@1", max_new_tokens=8, temperature=0.9, seed=k)))
    work += [
        (3, _req("pen", SHARED + [1, 2], "b", repetition_penalty=1.3, presence_penalty=0.5,
                 frequency_penalty=0.4, max_new_tokens=10)),
        (4, _req("top", SHARED + [3, 4], None, top_logprobs=5, max_new_tokens=6)),
        (5, _req("stop", SHARED + [9], "a@1", stop=("e",), max_new_tokens=12, temperature=1.0, seed=5)),
        (6, _req("json", SHARED + [8, 8], "b", constraint=Constraint("json_object"), max_new_tokens=12, ignore_eos=False)),
        (12, _req("turn2", SHARED + [11, 12, 13, 99, 98, 97] * 2, "a@1", max_new_tokens=5)),
    ]
    return work


def _summary(outputs: dict[str, list]) -> dict[str, tuple]:
    return {rid: (tokens_of(outs), "".join(o.text for o in outs), outs[-1].finish_reason,
                  [round(p, 4) for o in outs for p in o.logprobs],
                  [tuple(t for t, _ in alts) for o in outs for alts in o.top_logprobs])
            for rid, outs in outputs.items()}


@pytest.mark.parametrize("limits", [None,                                                # one-step prefills
                                    pytest.param(dict(max_batch_tokens=32, kv_cache_memory="136KiB",
                                                      max_model_len=256, max_input_tokens=200),
                                                 marks=pytest.mark.slow, id="chunks-preemption")])
def test_outputs_with_the_cache_equal_outputs_without_it(tiny_llama_dir, store, on_off, limits):
    """Float32, same engine settings except the cache: every output matches exactly (the tiny
    model's suffix prefill runs the same kernels over the same K/V, so no near-ties arise here;
    the default-model oracle test bounds the differences a real model can show)."""
    on, off = on_off
    if limits is not None:
        on = make_engine(tiny_llama_dir, store=store, max_loras=4, **limits)
        off = make_engine(tiny_llama_dir, store=store, max_loras=4, prefix_caching=False, **limits)
    with_cache = run_checked(on, _workload())
    without = run_checked(off, _workload())
    assert _summary(with_cache) == _summary(without)
    hits = {rid: outs[-1].cached_tokens for rid, outs in with_cache.items()}
    assert all(outs[-1].cached_tokens == 0 for outs in without.values())
    assert hits["g10"] == 32 and hits["turn2"] == 32                     # across tails
    assert sum(hits[f"n{k}"] > 0 for k in range(3)) >= 2                 # siblings share the prompt
    blocks = on.scheduler.blocks
    assert blocks.num_free_blocks == blocks.num_blocks and blocks.num_cached_blocks > 0
    stats = blocks.stats
    assert 0 < stats.hit_tokens < stats.query_tokens
    if limits is not None:
        assert on.scheduler.total_preemptions > 0 and stats.evicted_blocks > 0


def test_reset_and_adapter_deletion_forget_cached_blocks(on_off):
    engine = on_off[0]
    prompt = SHARED + [1]
    run_checked(engine, [(0, _req("x", prompt, "a@1")), (0, _req("y", prompt, "b"))])
    assert engine.forget_adapter_blocks(["a@1"]) == 2
    again = run_checked(engine, [(0, _req("x2", prompt, "a@1")), (0, _req("y2", prompt, "b"))])
    assert again["x2"][-1].cached_tokens == 0 and again["y2"][-1].cached_tokens == 32
    assert engine.reset_prefix_cache() is True
    assert engine.scheduler.blocks.num_cached_blocks == 0
    assert run_checked(engine, [(0, _req("y3", prompt, "b"))])["y3"][-1].cached_tokens == 0

"""LLMEngine on the tiny random model: seeds, stops, aborts, limits."""

from __future__ import annotations

import pytest

from engine_helpers import make_engine, run_staggered, tokens_of
from loraplex.server.engine.io import GenerationRequest, QueueFull, RequestRejected
from loraplex.server.engine.sequence import FinishReason, SamplingParams


def _req(rid, prompt=(5, 6, 7, 8), **sampling):
    return GenerationRequest(request_id=rid, prompt_token_ids=tuple(prompt),
                             sampling=SamplingParams(**sampling))


@pytest.fixture(scope="module")
def engine(tiny_llama_dir):
    return make_engine(tiny_llama_dir, max_queued_requests=8)


def test_seeded_sampling_is_independent_of_batch(engine):
    params = dict(max_new_tokens=12, temperature=0.9, top_p=0.95, top_k=50, seed=1234, ignore_eos=True)
    alone = tokens_of(run_staggered(engine, [(0, _req("alone", **params))])["alone"])
    others = [(0, _req(f"o{i}", prompt=(9 + i,) * (3 + i), max_new_tokens=8 + i, temperature=1.2,
                       seed=i, ignore_eos=True)) for i in range(5)]
    mixed = run_staggered(engine, others[:3] + [(2, _req("in-batch", **params))] + others[3:])
    assert tokens_of(mixed["in-batch"]) == alone
    different = tokens_of(run_staggered(engine, [(0, _req("s2", **{**params, "seed": 99}))])["s2"])
    assert different != alone


def test_max_new_tokens_and_finish_reason(engine):
    out = run_staggered(engine, [(0, _req("len", max_new_tokens=5, ignore_eos=True))])["len"]
    assert len(tokens_of(out)) == 5 and out[-1].finish_reason is FinishReason.LENGTH
    assert out[-1].generated_tokens == 5 and out[-1].prompt_tokens == 4
    assert out[-1].timing is not None and out[-1].timing.total_s >= out[-1].timing.first_token_s


def test_stop_token_ids_and_stop_strings(engine):
    free = tokens_of(run_staggered(engine, [(0, _req("free", max_new_tokens=10, ignore_eos=True))])["free"])
    stop_id = free[3]
    out = run_staggered(engine, [(0, _req("sid", max_new_tokens=10, ignore_eos=True,
                                          stop_token_ids=(stop_id,)))])["sid"]
    assert tokens_of(out) == free[: free.index(stop_id) + 1]
    assert out[-1].finish_reason is FinishReason.STOP
    text = "".join(o.text for o in run_staggered(
        engine, [(0, _req("txt", max_new_tokens=10, ignore_eos=True))])["txt"])
    needle = text[len(text) // 2: len(text) // 2 + 2]
    if needle.strip():
        out = run_staggered(engine, [(0, _req("sstr", max_new_tokens=10, ignore_eos=True,
                                              stop=(needle,)))])["sstr"]
        got = "".join(o.text for o in out)
        assert needle not in got and text.startswith(got)
        assert out[-1].finish_reason is FinishReason.STOP


def test_abort_frees_blocks_at_once(engine):
    blocks = engine.scheduler.blocks
    engine.add_request(_req("ab", prompt=tuple(range(10, 60)), max_new_tokens=50, ignore_eos=True))
    engine.step()
    assert blocks.num_free_blocks < blocks.num_blocks
    final = engine.abort("ab")
    assert final is not None and final.finish_reason is FinishReason.ABORT
    assert blocks.num_free_blocks == blocks.num_blocks
    assert not engine.has_work()


@pytest.mark.parametrize("field,request_kwargs", [
    ("sampling.top_p", dict(top_p=1.5)),
    ("sampling.temperature", dict(temperature=float("nan"))),
    ("sampling.max_new_tokens", dict(max_new_tokens=100_000)),
])
def test_bad_fields_are_rejected_by_name(engine, field, request_kwargs):
    with pytest.raises(RequestRejected) as info:
        engine.add_request(_req("bad", **request_kwargs))
    assert info.value.field_name == field


def test_prompt_too_long_and_out_of_vocab(engine):
    with pytest.raises(RequestRejected, match="limit"):
        engine.add_request(_req("long", prompt=(5,) * 1000))
    with pytest.raises(RequestRejected, match="token ids"):
        engine.add_request(_req("oov", prompt=(10**9,)))


def test_queue_full(engine):
    for i in range(8):
        engine.add_request(_req(f"q{i}", max_new_tokens=2))
    with pytest.raises(QueueFull):
        engine.add_request(_req("one-too-many"))
    while engine.has_work():
        engine.step()


def test_chat_messages_are_rendered(engine):
    request = GenerationRequest(request_id="chat", messages=(("user", "Hello!"),),
                                sampling=SamplingParams(max_new_tokens=3, ignore_eos=True))
    out = run_staggered(engine, [(0, request)])["chat"]
    assert out[-1].prompt_tokens > 3
    with pytest.raises(RequestRejected) as info:
        engine.add_request(GenerationRequest(request_id="badchat", messages=(("robot", "x"),)))
    assert info.value.field_name == "messages[0].role"

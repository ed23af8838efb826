"""Structured output on the tiny random Llama: a random model is an adversary for the masks
(it would pick any token, special ones included), so every constrained output that parses
shows the masks hold. Also: the bitmask twin, checks, compile errors, the cache bound,
unconstrained rows untouched, and an LM head wider than the tokenizer."""

from __future__ import annotations

import json
import re
import time

import jsonschema
import pytest
import torch

from engine_helpers import make_engine, run_staggered, tokens_of
from model_helpers import build_tiny_llama
from loraplex.server.engine.constraints import Constraint, ConstraintError, ConstraintLimits
from loraplex.server.engine.constraints.compiler import ConstraintCompiler
from loraplex.server.engine.constraints.masks import (apply_token_bitmask, disallowed_rows, disallowed_tokens,
                                                     mask_rows)
from loraplex.server.engine.io import GenerationRequest, RequestRejected
from loraplex.server.engine.sequence import FinishReason, SamplingParams

PROMPT = (5, 6, 7, 8, 9)
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["id", "kind", "tags"],
          "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 999},
                         "kind": {"enum": ["a", "b"]},
                         "tags": {"type": "array", "maxItems": 2, "items": {"type": "string", "maxLength": 4}},
                         "note": {"type": "string", "maxLength": 6}}}

ARRAY = {"type": "array", "minItems": 1, "maxItems": 3, "items": {"type": "boolean"}}


def _req(rid: str, constraint: Constraint | None, max_new_tokens: int = 96, **sampling) -> GenerationRequest:
    return GenerationRequest(request_id=rid, prompt_token_ids=PROMPT,
                             sampling=SamplingParams(max_new_tokens=max_new_tokens, constraint=constraint, **sampling))


def _text(outputs) -> str:
    return "".join(o.text for o in outputs)


@pytest.fixture(scope="module")
def engine(tiny_llama_dir):
    return make_engine(tiny_llama_dir, max_num_seqs=8, max_batch_tokens=128)


def test_bitmask_twin_matches_a_per_token_loop():
    torch.manual_seed(0)
    vocab = 100                                                          # not a multiple of 32
    bitmask = torch.randint(-2**31, 2**31 - 1, (3, 4), dtype=torch.int32)  # [3, 4 words]
    logits = torch.randn(3, vocab + 5)                                   # LM head wider than the mask
    masked = apply_token_bitmask(logits.clone(), bitmask)
    for row in range(3):
        for token in range(vocab + 5):
            word = int(bitmask[row, token // 32]) if token < 128 else 0
            allowed = token < 128 and (word >> (token % 32)) & 1
            expected = logits[row, token].item() if allowed else float("-inf")
            assert masked[row, token].item() == expected, (row, token)
    assert disallowed_tokens(bitmask, 128).shape == (3, 128)


def test_served_mask_path_matches_the_torch_reference():
    torch.manual_seed(1)
    bitmask = torch.randint(-2**31, 2**31 - 1, (2, 5), dtype=torch.int32)   # [2, 5 words] = 160 tokens
    for vocab in (150, 160, 170):
        assert (disallowed_rows(bitmask, vocab) == disallowed_tokens(bitmask, vocab).numpy()).all()
        logits = torch.randn(4, vocab)                                       # rows 1 and 3 constrained
        expected = logits.clone()
        expected[[1, 3]] = apply_token_bitmask(expected[[1, 3]], bitmask)
        served = mask_rows(logits.clone(), [1, 3], disallowed_rows(bitmask, vocab))
        assert torch.equal(served, expected)
        assert torch.equal(served[[0, 2]], logits[[0, 2]])                  # other rows untouched


@pytest.mark.parametrize("constraint, problem", [
    (Constraint("xml", "<a/>"), "set one of json_schema, json_object"),
    (Constraint("regex", ""), "the regex is empty"),
    (Constraint("choice"), "at least one string"),
    (Constraint("choice", choices=("a", "")), "non-empty"),
    (Constraint("json_schema", "{not json"), "not valid JSON"),
    (Constraint("json_schema", "[1, 2]"), "must be a JSON object"),
    (Constraint("json_object", "{}"), "takes no schema"),
    (Constraint("grammar", "x" * 70_000), "the limit is 65536"),
])
def test_checks_name_the_problem(constraint, problem):
    with pytest.raises(ConstraintError, match=re.escape(problem)):
        constraint.check(ConstraintLimits(max_source_bytes=65536))


@pytest.fixture(scope="module")
def compiler(engine):
    return engine.constraints


@pytest.mark.parametrize("constraint, problem", [
    (Constraint("json_schema", json.dumps({"type": "strnig"})), "strnig"),
    (Constraint("json_schema", json.dumps({"$ref": "#/$defs/missing"})), "missing"),
    (Constraint("regex", "(unclosed"), "regex"),
    (Constraint("grammar", "start: undefined_rule"), "undefined_rule"),
])
def test_invalid_constraints_fail_with_the_reason(compiler, constraint, problem):
    with pytest.raises(ConstraintError, match=problem):
        compiler.guide(constraint)


def test_pathological_schema_fails_fast(compiler):
    deep: dict = {"type": "integer"}
    for _ in range(300):
        deep = {"type": "object", "properties": {"a": deep}, "required": ["a"]}
    started = time.monotonic()
    with pytest.raises(ConstraintError, match="limit"):
        compiler.guide(Constraint("json_schema", json.dumps(deep)))
    assert time.monotonic() - started < 5.0


def test_cache_is_bounded_and_reuses_compiles(tiny_llama_dir, engine):
    events = []
    small = ConstraintCompiler(engine.tokenizer, 49152, (2,), ConstraintLimits(cache_size=2))
    small.set_event_hook(lambda event, kind, seconds: events.append(event))
    for pattern in ("a+", "b+", "a+", "c+", "b+"):
        small.guide(Constraint("regex", pattern))
    assert small.num_cached == 2
    # a+ compiled, b+ compiled, a+ hit, c+ compiled (evicts b+), b+ compiled again
    assert events.count("request") == 5 and events.count("compiled") == 4
    small.close()


def test_constrained_rows_always_match_and_free_rows_are_untouched(engine):
    free = [_req(f"free{i}", None, max_new_tokens=12, ignore_eos=True) for i in range(2)]
    alone = {r.request_id: tokens_of(run_staggered(engine, [(0, r)])[r.request_id]) for r in free}
    constrained = [
        _req("schema-greedy", Constraint("json_schema", json.dumps(SCHEMA))),
        _req("schema-sampled", Constraint("json_schema", json.dumps(SCHEMA)), temperature=1.0, seed=7),
        _req("array", Constraint("json_schema", json.dumps(ARRAY)), temperature=1.0, seed=3),
        _req("regex", Constraint("regex", r"[A-Z]{2}-\d{3}"), temperature=1.0, seed=1),
        _req("choice", Constraint("choice", choices=("yes", "no", 'say "hi"')), temperature=1.0, seed=2),
        _req("lark", Constraint("grammar", 'start: "(" num ("+" num)* ")"\nnum: /[0-9]{1,3}/'), max_new_tokens=40),
    ]
    outputs = run_staggered(engine, [(0, r) for r in free + constrained])
    for request in free:                     # same tokens in a batch with constrained rows
        assert tokens_of(outputs[request.request_id]) == alone[request.request_id]
    for request in constrained:
        assert outputs[request.request_id][-1].finish_reason is FinishReason.EOS, request.request_id
        assert outputs[request.request_id][-1].token_ids[-1:] == (2,)    # the grammar ends with EOS
    for rid in ("schema-greedy", "schema-sampled"):
        jsonschema.validate(json.loads(_text(outputs[rid])), SCHEMA)
    jsonschema.validate(json.loads(_text(outputs["array"])), ARRAY)
    assert re.fullmatch(r"[A-Z]{2}-\d{3}", _text(outputs["regex"]))
    assert _text(outputs["choice"]) in ("yes", "no", 'say "hi"')
    assert re.fullmatch(r"\(\d{1,3}(\+\d{1,3})*\)", _text(outputs["lark"]))
    special = set(engine.tokenizer.all_special_ids) - {2}
    for request in constrained:
        assert not special & set(tokens_of(outputs[request.request_id])), request.request_id


def test_seeded_constrained_sampling_repeats(engine):
    constraint = Constraint("json_schema", json.dumps(SCHEMA))
    first = run_staggered(engine, [(0, _req("s1", constraint, temperature=1.0, seed=11))])["s1"]
    second = run_staggered(engine, [(0, _req("s2", constraint, temperature=1.0, seed=11)),
                                    (0, _req("other", None, max_new_tokens=20, temperature=1.0))])["s2"]
    assert tokens_of(first) == tokens_of(second)


def test_stop_strings_and_streaming_deltas(engine):
    constraint = Constraint("regex", r"abc-[0-9]{2}-xyz")
    outputs = run_staggered(engine, [(0, _req("stop", constraint, stop=["-xy"]))])["stop"]
    assert _text(outputs) .startswith("abc-") and outputs[-1].finish_reason is FinishReason.STOP
    assert "-xy" not in _text(outputs) and len(outputs) > 1          # streamed in deltas


def test_engine_rejects_bad_constraints_with_the_field(engine):
    with pytest.raises(RequestRejected) as info:
        engine.add_request(_req("bad", Constraint("json_schema", json.dumps({"type": "strnig"}))))
    assert info.value.field_name == "sampling.constraint" and "strnig" in info.value.message
    with pytest.raises(RequestRejected) as info:
        engine.add_request(_req("eos", Constraint("json_object"), ignore_eos=True))
    assert info.value.field_name == "sampling.ignore_eos"
    assert not engine.has_work()


def test_lm_head_wider_than_the_tokenizer(tmp_path, default_model_dir):
    model_dir = build_tiny_llama(tmp_path / "wide", default_model_dir, vocab_size=49152 + 64)
    engine = make_engine(model_dir, max_num_seqs=4, max_batch_tokens=64)
    assert engine.constraints.vocab_size == 49152 + 64
    outputs = run_staggered(engine, [(0, _req("wide", Constraint("json_schema", json.dumps(SCHEMA)),
                                              temperature=1.0, seed=5))])["wide"]
    assert all(t < 49152 for t in tokens_of(outputs))
    jsonschema.validate(json.loads(_text(outputs)), SCHEMA)


# ---- issue 31: masks the grammar cannot compute (6), masks too costly to serve (7) -------------

CANNOT_ENFORCE = Constraint("regex", "(.{1,100}){1,100}")       # compiles; its first mask fails


def test_a_grammar_whose_mask_fails_is_refused_at_compile_with_a_short_reason(compiler, engine):
    """Defect 6: the mask failed inside llguidance and allowed only end-of-sequence: 200/stop
    with empty text that violates the constraint. Now refused before admission, one line."""
    with pytest.raises(ConstraintError, match="cannot be enforced: lexer error") as info:
        compiler.guide(CANNOT_ENFORCE)
    assert "\n" not in str(info.value) and len(str(info.value)) < 400
    with pytest.raises(RequestRejected) as rejected:
        engine.add_request(_req("cannot", CANNOT_ENFORCE))
    assert rejected.value.field_name == "sampling.constraint"


def test_a_mask_failing_during_generation_ends_as_a_rejection_not_an_empty_success(compiler, engine):
    """The same failure after admission (a grammar passing the compile-time probe can still hit a
    parser limit later) finishes the request with a RequestRejected naming the constraint."""
    import llguidance

    from loraplex.server.engine.constraints.compiler import Guide, grammar_text

    matcher = llguidance.LLMatcher(compiler.tokenizer(), grammar_text(CANNOT_ENFORCE), log_level=0,
                                   limits=llguidance.LLParserLimits())
    assert not matcher.is_error()                          # compiles: only computing a mask fails
    engine.add_request(_req("late", CANNOT_ENFORCE), guide=Guide(matcher, "regex"))
    outputs = []
    while engine.has_work():
        produced, _ = engine.step()
        outputs += produced
    last = outputs[-1]
    assert last.finish_reason is FinishReason.ERROR and isinstance(last.error, RequestRejected)
    assert last.error.field_name == "sampling.constraint" and "cannot be enforced" in last.error.message
    assert "\n" not in last.error.message


def test_grammars_too_costly_to_mask_are_refused_and_cheap_ones_served(compiler, engine):
    """Defect 7: `a{50000}` (8 bytes) cost every step of every batch it ran in ~12 ms per token.
    Grammars whose first mask costs more than the budget (--constraint-mask-budget, default
    10 ms) are refused, measured on the grammar thread at compile. The margins are wide on any
    CPU: ordinary grammars take well under 0.5 ms, `a{50000}` over 8 ms, against a 2 ms budget."""
    strict = ConstraintCompiler(engine.tokenizer, 49152, (2,), ConstraintLimits(max_mask_ms=2.0))
    with pytest.raises(ConstraintError, match="ms per token to enforce"):
        strict.guide(Constraint("regex", "a{50000}"))
    for cheap in ("[a-z]+", "a{50}", "(yes|no)"):
        strict.guide(Constraint("regex", cheap))
        compiler.guide(Constraint("regex", cheap))
    strict.close()


LATE_COSTLY = Constraint("grammar", 's: s s s | s s | "a" | "b"\nstart: s')   # ambiguous: Earley work grows


def test_a_grammar_costly_after_its_start_is_ended_naming_the_budget(tiny_llama_dir):
    """Defect 7 past the first mask: an ambiguous grammar's first mask is cheap (~0.1 ms) and
    each later one costlier (its Earley sets grow with the text: ~6 ms after 10 tokens of
    `aaaa`, ~90 ms after 30, ~500 ms after 55, here). The compile-time probe passes it; before,
    the request then ran to max_new_tokens with every step paying its mask. Now the masks are
    timed during generation and it ends after MASK_STRIKES tokens over the budget with a
    RequestRejected naming --constraint-mask-budget, while an unconstrained row in the same
    batches finishes normally."""
    from loraplex.server.engine.constraints.masks import MASK_STRIKES

    engine = make_engine(tiny_llama_dir, max_num_seqs=4, max_batch_tokens=64, constraint_mask_budget_ms=1.0)
    try:
        engine.constraints.guide(LATE_COSTLY)                      # passes the compile-time probe
        outputs = run_staggered(engine, [(0, _req("costly", LATE_COSTLY, max_new_tokens=64)),
                                         (0, _req("plain", None, max_new_tokens=64))])
    finally:
        engine.constraints.close()
        engine.guided.close()
    last = outputs["costly"][-1]
    assert last.finish_reason is FinishReason.ERROR and isinstance(last.error, RequestRejected)
    assert last.error.field_name == "sampling.constraint"
    assert "ms per token" in last.error.message and "--constraint-mask-budget" in last.error.message
    assert f"{MASK_STRIKES} tokens over the budget" in last.error.message
    assert len(tokens_of(outputs["costly"])) < 64
    assert outputs["plain"][-1].finish_reason is FinishReason.LENGTH
    assert len(tokens_of(outputs["plain"])) == 64

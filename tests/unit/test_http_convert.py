"""OpenAI request bodies -> engine requests, and errors -> OpenAI error bodies (no server)."""

from __future__ import annotations

import json
import itertools

import pytest

from loraplex.server.engine.config import RequestLimits
from loraplex.server.engine.io import QueueFull, RequestRejected
from loraplex.server.http.convert import chat_request, completion_request
from loraplex.server.http.errors import ApiError, to_api_error

BASE = "tiny"
LIMITS = RequestLimits(max_new_tokens=400)


def _ids():
    counter = itertools.count()
    return lambda: f"r{next(counter)}"


def _completion(**body):
    return completion_request({"model": BASE, "prompt": "hi", **body}, BASE, "acme", LIMITS, _ids())


def _chat(**body):
    return chat_request({"model": BASE, "messages": [{"role": "user", "content": "hi"}], **body},
                        BASE, None, LIMITS, _ids())


def _param_of(call, **body) -> tuple[int, str | None]:
    with pytest.raises((ApiError, RequestRejected)) as caught:
        call(**body)
    error = to_api_error(caught.value, "messages")
    return error.status, error.param


def test_model_names_and_choices():
    parsed = _completion(model="tone@2", prompt=["a", "b"], n=3, seed=10, temperature=0.5, max_tokens=7)
    assert parsed.adapter_id == "tone@2" and parsed.model == "tone@2"
    assert [c.index for c in parsed.choices] == list(range(6))
    assert [c.request.prompt for c in parsed.choices] == ["a"] * 3 + ["b"] * 3
    assert [c.request.sampling.seed for c in parsed.choices] == [10, 11, 12] * 2
    assert all(c.request.tenant == "acme" and c.request.sampling.max_new_tokens == 7 for c in parsed.choices)
    assert _completion().adapter_id is None and _completion().choices[0].request.sampling.temperature == 1.0
    tokens = _completion(prompt=[[1, 2, 3], [4, 5]])
    assert [c.request.prompt_token_ids for c in tokens.choices] == [(1, 2, 3), (4, 5)]
    assert _param_of(_completion, model="bad name!") == (400, "model")          # malformed: 400, as over gRPC


def test_every_parameter_reaches_the_engine():
    parsed = _chat(max_completion_tokens=9, max_tokens=3, top_p=0.5, stop="END", presence_penalty=0.5,
                   frequency_penalty=-0.25, logprobs=True, top_logprobs=4, top_k=20, repetition_penalty=1.1,
                   ignore_eos=True, min_tokens=2, stop_token_ids=[7], stream=True,
                   stream_options={"include_usage": True})
    sampling = parsed.choices[0].request.sampling
    assert (sampling.max_new_tokens, sampling.top_p, sampling.stop, sampling.top_k) == (9, 0.5, ("END",), 20)
    assert (sampling.presence_penalty, sampling.frequency_penalty, sampling.min_tokens) == (0.5, -0.25, 2)
    assert sampling.logprobs and sampling.top_logprobs == 4 and sampling.ignore_eos
    assert sampling.stop_token_ids == (7,) and sampling.repetition_penalty == pytest.approx(1.1)
    assert parsed.stream and parsed.include_usage and parsed.logprobs == 4
    assert parsed.choices[0].request.messages == (("user", "hi"),)


def test_unsupported_and_unknown_parameters_are_named():
    assert _param_of(_chat, response_format={"type": "json_schema"}) == (400, "response_format.json_schema")
    assert _param_of(_chat, response_format={"type": "xml"}) == (400, "response_format.type")
    assert _param_of(_chat, response_format={"type": "json_object"}, guided_regex="a") == (400, "guided_regex")
    assert _param_of(_chat, guided_choice="yes") == (400, "guided_choice")
    assert _param_of(_chat, tools=[{"type": "function"}]) == (400, "tools.0")
    assert _param_of(_chat, functions=[{"name": "f"}]) == (400, "functions")
    assert _param_of(_chat, logit_bias={"5": 1}) == (400, "logit_bias")
    assert _param_of(_chat, frobnicate=True) == (400, "frobnicate")
    assert _param_of(_completion, echo=True) == (400, "echo")
    assert _param_of(_completion, suffix="x") == (400, "suffix")
    assert _param_of(_completion, best_of=3) == (400, "best_of")
    assert _param_of(_chat, top_logprobs=2) == (400, "top_logprobs")             # needs logprobs: true
    assert _param_of(_chat, max_tokens=401) == (400, "max_tokens")
    assert _param_of(_chat, presence_penalty=2.5) == (400, "presence_penalty")
    assert _param_of(_chat, min_tokens=500, max_tokens=10) == (400, "min_tokens")
    assert _param_of(_chat, temperature=-1) == (400, "temperature")
    assert _param_of(_chat, n=0) == (400, "n")
    assert _param_of(_chat, stream_options={"include_usage": True}) == (400, "stream_options")
    assert _param_of(_chat, messages=[{"role": "robot", "content": "x"}]) == (400, "messages.0.role")
    assert _param_of(_chat, messages=[{"role": "tool", "content": "x"}]) == (400, "messages.0.tool_call_id")
    image = [{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {"url": "x"}}]
    assert _param_of(_chat, messages=[{"role": "user", "content": image}]) == (400, "messages.0.content.1")
    # explicit "off" values change nothing and are accepted
    _chat(response_format={"type": "text"}, tools=[], tool_choice="none", user="u1")
    assert _chat(messages=[{"role": "developer", "content": [{"type": "text", "text": "be brief"}]}]
                 ).choices[0].request.messages == (("system", "be brief"),)


def test_engine_errors_map_to_openai_params_and_statuses():
    assert to_api_error(RequestRejected("sampling.max_new_tokens", "too many")).param == "max_tokens"
    assert to_api_error(RequestRejected("sampling.presence_penalty", "bad")).param == "presence_penalty"
    assert to_api_error(RequestRejected("", "prompt too long"), "messages").param == "messages"
    assert to_api_error(RequestRejected("prompt_token_ids", "bad ids")).param == "prompt"
    assert to_api_error(RequestRejected("messages[1].role", "bad role"), "messages").param == "messages.1.role"
    assert to_api_error(RequestRejected("adapter_id", "no adapters")).param == "model"
    full = to_api_error(QueueFull("busy", retry_after_s=2.4))
    assert full.status == 429 and full.headers["Retry-After"] == "2"
    assert full.body()["error"]["type"] == "rate_limit_error"
    from loraplex.adapters_store.errors import AdapterNotFound

    missing = to_api_error(AdapterNotFound("no adapter 'x'"))
    assert (missing.status, missing.param, missing.code) == (404, "model", "model_not_found")
    bug = to_api_error(ZeroDivisionError("secret detail"))
    assert bug.status == 500 and "secret" not in bug.message and "incident" in bug.message


def test_structured_output_parameters_become_the_engine_constraint():
    from loraplex.server.engine.constraints import Constraint

    def constraint(**kwargs):
        return _chat(**kwargs).choices[0].request.sampling.constraint

    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    got = constraint(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema,
                                                                             "strict": True}})
    assert got.kind == "json_schema" and json.loads(got.value) == schema
    assert constraint(response_format={"type": "json_object"}) == Constraint("json_object")
    assert json.loads(constraint(guided_json=schema).value) == schema
    assert constraint(guided_regex="x+") == Constraint("regex", "x+")
    assert constraint(guided_choice=["a", "b"]) == Constraint("choice", choices=("a", "b"))
    assert constraint(guided_grammar='start: "a"') == Constraint("grammar", 'start: "a"')
    assert constraint(response_format={"type": "text"}) is None and constraint() is None

"""The engine's request validator (one owner of every check) and the gRPC field-name mapping."""

from __future__ import annotations

import math

import pytest

from loraplex.server.engine.config import RequestLimits
from loraplex.server.engine.io import GenerationRequest, RequestRejected
from loraplex.server.engine.sequence import SamplingParams
from loraplex.server.engine.validation import check_prompt, check_request, validate_request, with_defaults
from loraplex.server.service.convert import wire_field

LIMITS = RequestLimits(max_input_tokens=8, max_new_tokens=100, max_stop_sequences=2)


def _request(**sampling) -> GenerationRequest:
    return GenerationRequest("r", prompt="hi", sampling=SamplingParams(**sampling))


def test_every_problem_is_reported_with_engine_paths():
    request = GenerationRequest("r", adapter_id="../x", sampling=SamplingParams(
        max_new_tokens=101, temperature=math.nan, top_p=0.0, stop=("a", "b", "c")))
    fields = [v.field for v in check_request(request, LIMITS)]
    assert fields == ["", "adapter_id", "sampling.max_new_tokens", "sampling.temperature",
                      "sampling.top_p", "sampling.stop"]
    with pytest.raises(RequestRejected) as error:
        validate_request(request, LIMITS)
    assert [v.field for v in error.value.violations] == fields and error.value.field_name == ""


def test_unset_max_new_tokens_gets_the_capped_default():
    assert with_defaults(_request(), LIMITS).sampling.max_new_tokens == 100
    assert with_defaults(_request(), RequestLimits()).sampling.max_new_tokens == 256
    assert with_defaults(_request(max_new_tokens=7), LIMITS).sampling.max_new_tokens == 7


def test_prompt_checks_after_tokenizing():
    request = with_defaults(_request(max_new_tokens=10), LIMITS)
    assert check_prompt(request, [1, 2], LIMITS, max_model_len=16, vocab_size=50) == []
    assert [v.field for v in check_prompt(request, [], LIMITS, 16, 50)] == ["prompt"]      # names the input
    too_long = check_prompt(request, [1] * 9, LIMITS, 64, 50)[0]
    assert too_long.field == "prompt" and "limit is 8" in too_long.description
    assert check_prompt(request, [1] * 7, LIMITS, 16, 50)[0].field == "sampling.max_new_tokens"
    assert check_prompt(request, [99], LIMITS, 16, 50)[0].field == "prompt_token_ids"


@pytest.mark.parametrize("path,wire", [
    ("", "input"), ("prompt", "input.prompt"), ("messages", "input.chat.messages"),
    ("messages[1].role", "input.chat.messages[1].role"), ("sampling.top_p", "input.sampling.top_p"),
    ("adapter_id", "input.adapter_id"), ("prompt_token_ids", "input"), ("request_id", "request_id"),
])
def test_grpc_maps_engine_paths_onto_proto_paths(path, wire):
    assert wire_field(path) == wire

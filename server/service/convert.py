"""Proto <-> engine types for generation, and engine field paths -> proto field paths.

The converter checks nothing: the engine's validator (engine/validation.py) owns every check
and names fields relative to GenerationRequest; `wire_field` maps those names onto this API's
proto paths (`sampling.top_p` -> `input.sampling.top_p`), so clients see the fields they sent.
"""

from __future__ import annotations

from ...v1 import generation_pb2 as pb
from ..engine.config import RequestLimits
from ..engine.constraints.spec import Constraint
from ..engine.io import GenerationRequest, RequestOutput, RequestRejected
from ..engine.sequence import FinishReason, SamplingParams
from ..engine.validation import check_request
from .errors import FieldViolation, invalid_argument

_FINISH = {FinishReason.LENGTH: pb.FINISH_REASON_LENGTH, FinishReason.EOS: pb.FINISH_REASON_EOS,
           FinishReason.STOP: pb.FINISH_REASON_STOP}

# GenerationRequest field (first path segment) -> GenerationInput proto path.
_WIRE_NAMES = {"": "input", "prompt": "input.prompt", "messages": "input.chat.messages",
               "prompt_token_ids": "input", "adapter_id": "input.adapter_id", "sampling": "input.sampling"}


def wire_field(path: str) -> str:
    """An engine field path (validation.py) -> the proto path of the same field in this API."""
    head = path.split(".", 1)[0].split("[", 1)[0]
    wire = _WIRE_NAMES.get(head)
    return path if wire is None else wire + path[len(head):]


def wire_violations(error: RequestRejected) -> list[FieldViolation]:
    return [FieldViolation(wire_field(v.field), v.description) for v in error.violations]


def to_generation_request(message: pb.GenerationInput, request_id: str, tenant: str | None,
                          limits: RequestLimits) -> GenerationRequest:
    """The engine's request for a proto input; raises INVALID_ARGUMENT (every problem, proto
    paths) when the engine's validator refuses it, before the request waits for the engine."""
    request = GenerationRequest(request_id=request_id, prompt=_prompt(message), messages=_messages(message),
                                adapter_id=message.adapter_id or None,
                                sampling=_sampling(message.sampling), tenant=tenant)
    violations = check_request(request, limits)
    if violations:
        raise invalid_argument(wire_violations(RequestRejected.of(violations)))
    return request


def _prompt(message: pb.GenerationInput) -> str | None:
    return message.prompt if message.WhichOneof("input") == "prompt" else None


def _messages(message: pb.GenerationInput) -> tuple[tuple[str, str], ...] | None:
    if message.WhichOneof("input") != "chat":
        return None
    return tuple((item.role, item.content) for item in message.chat.messages)


def _sampling(params: pb.SamplingParams) -> SamplingParams:
    def given(name: str, default):
        return getattr(params, name) if params.HasField(name) else default

    defaults = SamplingParams()
    return SamplingParams(max_new_tokens=given("max_new_tokens", None),
                          temperature=given("temperature", defaults.temperature),
                          top_p=given("top_p", defaults.top_p), top_k=given("top_k", defaults.top_k),
                          repetition_penalty=given("repetition_penalty", defaults.repetition_penalty),
                          seed=given("seed", None), stop=tuple(params.stop),
                          stop_token_ids=tuple(params.stop_token_ids), ignore_eos=params.ignore_eos,
                          logprobs=params.logprobs, constraint=_constraint(params), **_openai_extras(params))


def _constraint(params: pb.SamplingParams) -> Constraint | None:
    """The proto Constraint as the engine's (no kind, or json_object false -> kind "", which the
    validator refuses naming the kinds)."""
    if not params.HasField("constraint"):
        return None
    message = params.constraint
    kind = message.WhichOneof("kind")
    if kind is None or (kind == "json_object" and not message.json_object):
        return Constraint("")
    if kind == "json_object":
        return Constraint("json_object")
    if kind == "choice":
        return Constraint("choice", choices=tuple(message.choice.choices))
    return Constraint(kind, getattr(message, kind))


def _openai_extras(params: pb.SamplingParams) -> dict:
    """presence / frequency penalties, min_tokens, top_logprobs, skip_special_tokens (fields 12-16;
    checked by the engine)."""
    extras = {name: getattr(params, name)
              for name in ("presence_penalty", "frequency_penalty", "min_tokens", "skip_special_tokens")
              if params.HasField(name)}
    extras["top_logprobs"] = params.top_logprobs
    return extras


def finish_reason(reason: FinishReason | None) -> int:
    return _FINISH.get(reason, pb.FINISH_REASON_UNSPECIFIED) if reason else pb.FINISH_REASON_UNSPECIFIED


def stream_response(output: RequestOutput) -> pb.GenerateStreamResponse:
    response = pb.GenerateStreamResponse(text=output.text, token_ids=list(output.token_ids),
                                         logprobs=list(output.logprobs), adapter_id=output.adapter_key or "",
                                         top_logprobs=_top_logprobs(output.top_logprobs))
    if output.finished:
        response.finish_reason = finish_reason(output.finish_reason)
        _fill_tail(response, output)
    return response


def unary_response(outputs: list[RequestOutput]) -> pb.GenerateResponse:
    """Join a request's deltas into one response."""
    last = outputs[-1]
    response = pb.GenerateResponse(
        text="".join(o.text for o in outputs), token_ids=[t for o in outputs for t in o.token_ids],
        logprobs=[p for o in outputs for p in o.logprobs], finish_reason=finish_reason(last.finish_reason),
        adapter_id=last.adapter_key or "",
        top_logprobs=_top_logprobs([alts for o in outputs for alts in o.top_logprobs]))
    _fill_tail(response, last)
    return response


def _top_logprobs(per_token) -> list[pb.TopLogprobs]:
    return [pb.TopLogprobs(alternatives=[pb.TokenLogprob(token_id=t, logprob=lp) for t, lp in alts])
            for alts in per_token]


def _fill_tail(response, output: RequestOutput) -> None:
    response.usage.prompt_tokens = output.prompt_tokens
    response.usage.generated_tokens = output.generated_tokens
    response.usage.cached_tokens = output.cached_tokens
    if output.timing is not None:
        response.timing.queue_seconds = output.timing.queue_s
        response.timing.first_token_seconds = output.timing.first_token_s
        response.timing.total_seconds = output.timing.total_s

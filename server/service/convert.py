"""Proto <-> engine types for generation, with field-by-field validation.

`to_generation_request` collects every problem of a request as a BadRequest field violation
(named by its proto path, e.g. `input.sampling.top_p`) and raises one INVALID_ARGUMENT.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from ...v1 import generation_pb2 as pb
from ..engine.constraints.spec import Constraint
from ..engine.io import GenerationRequest, RequestOutput
from ..engine.sequence import FinishReason, SamplingParams
from .errors import FieldViolation, invalid_argument

ADAPTER_REF_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}(@[1-9][0-9]{0,8})?$")
CHAT_ROLES = ("system", "user", "assistant")
DEFAULT_MAX_NEW_TOKENS = 256

_FINISH = {FinishReason.LENGTH: pb.FINISH_REASON_LENGTH, FinishReason.EOS: pb.FINISH_REASON_EOS,
           FinishReason.STOP: pb.FINISH_REASON_STOP}


@dataclass(frozen=True)
class RequestLimits:
    """The service-level limits checked before a request reaches the engine."""

    max_new_tokens: int
    max_stop_sequences: int


def to_generation_request(message: pb.GenerationInput, request_id: str, tenant: str | None,
                          limits: RequestLimits) -> GenerationRequest:
    problems: list[FieldViolation] = []
    prompt, messages = _input(message, problems)
    adapter = message.adapter_id.strip()
    if adapter and not ADAPTER_REF_RE.match(adapter):
        problems.append(FieldViolation("input.adapter_id", "must be 'name' or 'name@version' with name matching "
                                       "[A-Za-z0-9][A-Za-z0-9._-]{0,127}"))
    sampling = _sampling(message.sampling, limits, problems)
    if problems:
        raise invalid_argument(problems)
    return GenerationRequest(request_id=request_id, prompt=prompt, messages=messages,
                             adapter_id=adapter or None, sampling=sampling, tenant=tenant)


def _input(message: pb.GenerationInput, problems: list[FieldViolation]):
    kind = message.WhichOneof("input")
    if kind is None:
        problems.append(FieldViolation("input", "set exactly one of prompt or chat"))
        return None, None
    if kind == "prompt":
        if not message.prompt:
            problems.append(FieldViolation("input.prompt", "must not be empty"))
        return message.prompt, None
    chat = message.chat.messages
    if not chat:
        problems.append(FieldViolation("input.chat.messages", "must hold at least one message"))
    for index, item in enumerate(chat):
        if item.role not in CHAT_ROLES:
            problems.append(FieldViolation(f"input.chat.messages[{index}].role",
                                           f"must be one of {', '.join(CHAT_ROLES)} (got {item.role!r})"))
    return None, tuple((item.role, item.content) for item in chat)


def _sampling(params: pb.SamplingParams, limits: RequestLimits, problems: list[FieldViolation]) -> SamplingParams:
    def bad(name: str, description: str) -> None:
        problems.append(FieldViolation(f"input.sampling.{name}", description))

    max_new = params.max_new_tokens if params.HasField("max_new_tokens") else min(
        DEFAULT_MAX_NEW_TOKENS, limits.max_new_tokens)
    if not 1 <= max_new <= limits.max_new_tokens:
        bad("max_new_tokens", f"must be in [1, {limits.max_new_tokens}] (got {max_new})")
    temperature = params.temperature if params.HasField("temperature") else 0.0
    if not (math.isfinite(temperature) and temperature >= 0):
        bad("temperature", "must be a finite number >= 0")
    top_p = params.top_p if params.HasField("top_p") else 1.0
    if not (math.isfinite(top_p) and 0 < top_p <= 1):
        bad("top_p", "must be in (0, 1]")
    penalty = params.repetition_penalty if params.HasField("repetition_penalty") else 1.0
    if not (math.isfinite(penalty) and penalty > 0):
        bad("repetition_penalty", "must be a finite number > 0")
    seed = params.seed if params.HasField("seed") else None
    if seed is not None and seed >= 2**63:
        bad("seed", "must be < 2**63")
    if len(params.stop) > limits.max_stop_sequences:
        bad("stop", f"at most {limits.max_stop_sequences} stop sequences (got {len(params.stop)})")
    if any(not s for s in params.stop):
        bad("stop", "stop sequences must not be empty")
    return SamplingParams(max_new_tokens=max_new, temperature=temperature, top_p=top_p,
                          top_k=params.top_k if params.HasField("top_k") else 0,
                          repetition_penalty=penalty, seed=seed, stop=tuple(params.stop),
                          stop_token_ids=tuple(params.stop_token_ids), ignore_eos=params.ignore_eos,
                          logprobs=params.logprobs, constraint=_constraint(params, problems))


def _constraint(params: pb.SamplingParams, problems: list[FieldViolation]) -> Constraint | None:
    """The proto Constraint as the engine's; its content is checked by the engine (one owner)."""
    if not params.HasField("constraint"):
        return None
    message = params.constraint
    kind = message.WhichOneof("kind")
    if kind is None:
        problems.append(FieldViolation("input.sampling.constraint",
                                       "set one of json_schema, json_object, regex, choice, grammar"))
        return None
    if kind == "json_object":
        if not message.json_object:
            problems.append(FieldViolation("input.sampling.constraint.json_object", "must be true when set"))
        return Constraint("json_object")
    if kind == "choice":
        return Constraint("choice", choices=tuple(message.choice.choices))
    return Constraint(kind, getattr(message, kind))


def finish_reason(reason: FinishReason | None) -> int:
    return _FINISH.get(reason, pb.FINISH_REASON_UNSPECIFIED) if reason else pb.FINISH_REASON_UNSPECIFIED


def stream_response(output: RequestOutput) -> pb.GenerateStreamResponse:
    response = pb.GenerateStreamResponse(text=output.text, token_ids=list(output.token_ids),
                                         logprobs=list(output.logprobs), adapter_id=output.adapter_key or "")
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
        adapter_id=last.adapter_key or "")
    _fill_tail(response, last)
    return response


def _fill_tail(response, output: RequestOutput) -> None:
    response.usage.prompt_tokens = output.prompt_tokens
    response.usage.generated_tokens = output.generated_tokens
    if output.timing is not None:
        response.timing.queue_seconds = output.timing.queue_s
        response.timing.first_token_seconds = output.timing.first_token_s
        response.timing.total_seconds = output.timing.total_s

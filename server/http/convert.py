"""OpenAI request bodies -> engine GenerationRequests (one per prompt and choice).

Parameters that would change the output but are not implemented are refused by name
(`unsupported`); unknown fields are refused too. `response_format` and the `guided_*`
extensions go through structured.py (-> the engine's Constraint).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from pydantic import BaseModel, ValidationError

from ..engine.config import RequestLimits
from ..engine.constraints.spec import Constraint
from ..engine.io import GenerationRequest, RequestRejected
from ..engine.sequence import SamplingParams
from ..engine.tool_parsers import ToolFormat, keeps_special_tokens
from ..engine.tool_parsers.hermes import HermesFormat
from ..engine.validation import ADAPTER_REF_RE, check_request
from ..frontdoor.limits import FrontLimits
from .errors import ApiError, bad_request, unsupported
from .schemas import ChatCompletionRequest, ChatMessage, CompletionRequest, SamplingFields
from ..engine.tool_parsers.shaper import ChatShaper
from .structured import GUIDED, structured_output
from .tools import CHAT_EXTRAS, chat_options, tool_request

# Known OpenAI parameters this server does not implement yet -> a hint for the caller.
UNSUPPORTED = {
    "functions": "the deprecated function calling; use tools", "function_call": "the deprecated function "
    "calling; use tool_choice",
    "logit_bias": "", "audio": "", "modalities": "", "prediction": "", "reasoning_effort": "",
    "web_search_options": "", "service_tier": "", "store": "", "metadata": "",
}
CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}


@dataclass(frozen=True)
class Choice:
    """One engine request and where its output goes in the response."""

    index: int
    request: GenerationRequest


@dataclass(frozen=True)
class ParsedRequest:
    """A validated OpenAI request: its body, the engine requests, the adapter it uses."""

    body: SamplingFields
    choices: list[Choice]
    adapter_id: str | None
    model: str
    stream: bool
    include_usage: bool
    logprobs: int | None           # alternatives per token (0 = only the chosen token), None = off
    shaper: ChatShaper | None = None   # reasoning / tool-call parsing of chat output (tool_parsers/shaper.py)


@dataclass(frozen=True)
class ChatSetup:
    """What a chat request's agent fields need from the server: the tool-call format, the
    reasoning parser, and whether the caller may send its own chat_template."""

    fmt: ToolFormat
    reasoning_parser: str = ""
    admin: bool = False


def parse_body(model_type: type[BaseModel], data: Any) -> Any:
    """Validate a JSON body; the first problem becomes a 400 naming its parameter."""
    if not isinstance(data, dict):
        raise bad_request(None, "the request body must be a JSON object")
    try:
        return model_type.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        param = ".".join(str(part) for part in first["loc"]) or None
        raise bad_request(param, f"{param}: {first['msg']}" if param else first["msg"]) from None


def _refuse_unknown(body: SamplingFields, also_unsupported: dict[str, bool], known: tuple[str, ...] = ()) -> None:
    for name, value in body.extras().items():
        if name in known:
            continue
        if name in UNSUPPORTED and value in (None, [], {}, False):
            continue                                   # explicit "off" values change nothing
        if name in UNSUPPORTED:
            raise unsupported(name, UNSUPPORTED[name])
        if name != "response_format" and name not in GUIDED:
            raise bad_request(name, f"unknown parameter '{name}'")
    for name, used in also_unsupported.items():
        if used:
            raise unsupported(name)


def resolve_model(model: str | None, base_name: str) -> str | None:
    """`model` -> adapter id (None = the base model). A malformed id is the request's fault (400,
    as over gRPC); a well-formed unknown one fails later with 404."""
    if model is None or model == base_name:
        return None
    if not ADAPTER_REF_RE.fullmatch(model):
        raise bad_request("model", f"must be '{base_name}' (the base model), an adapter id or 'name@version' with "
                                   "name matching [A-Za-z0-9][A-Za-z0-9._-]{0,127} (GET /v1/models lists them)")
    return model


def sampling_params(body: SamplingFields, max_tokens: int | None, logprobs: int | None,
                    seed_offset: int, constraint: Constraint | None = None,
                    skip_special_tokens: bool = True) -> SamplingParams:
    """The engine's SamplingParams (OpenAI defaults: temperature 1); the engine's validator
    checks the ranges, and its field names map back to these parameters (errors.py).
    skip_special_tokens: the default when the body does not set it (vLLM's field)."""
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    values: dict[str, Any] = dict(
        max_new_tokens=max_tokens,                      # None = the engine's default
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=max(0, body.top_k or 0),
        repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
        seed=None if body.seed is None else (body.seed + seed_offset) % 2**63,
        stop=stop, stop_token_ids=tuple(body.stop_token_ids or ()), ignore_eos=bool(body.ignore_eos),
        logprobs=logprobs is not None, top_logprobs=logprobs or 0,
        presence_penalty=body.presence_penalty or 0.0, frequency_penalty=body.frequency_penalty or 0.0,
        min_tokens=body.min_tokens or 0, constraint=constraint,
        skip_special_tokens=skip_special_tokens if body.skip_special_tokens is None else body.skip_special_tokens)
    return SamplingParams(**values)


def _parsed(body: SamplingFields, inputs: list[dict[str, Any]], adapter: str | None, base_name: str,
            sampling: Callable[[int], SamplingParams], tenant: str | None, new_id: Callable[[], str],
            logprobs: int | None, limits: RequestLimits, shaper: ChatShaper | None = None) -> ParsedRequest:
    n = body.n or 1
    choices = []
    for prompt_index, fields in enumerate(inputs):
        for j in range(n):
            request = GenerationRequest(request_id=new_id(), adapter_id=adapter, sampling=sampling(j),
                                        tenant=tenant, **fields)
            if j == 0:                     # the engine's checks, before anything waits in its queue
                violations = check_request(request, limits)
                if violations:
                    raise RequestRejected.of(violations)
            choices.append(Choice(prompt_index * n + j, request))
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    if body.stream_options is not None and not body.stream:
        raise bad_request("stream_options", "stream_options is only allowed with stream: true")
    return ParsedRequest(body, choices, adapter, body.model or base_name, bool(body.stream), include_usage, logprobs,
                         shaper if shaper is not None and shaper.active else None)


def completion_request(data: Any, base_name: str, tenant: str | None, limits: RequestLimits,
                       new_id: Callable[[], str], front: FrontLimits | None = None) -> ParsedRequest:
    body: CompletionRequest = parse_body(CompletionRequest, data)
    if front is not None:                  # prompts x n, from the shape alone, before any request is built
        front.check_choices(_num_prompts(body.prompt), body.n or 1)
    best_of_differs = body.best_of is not None and body.best_of != (body.n or 1)
    _refuse_unknown(body, {"echo": bool(body.echo), "suffix": body.suffix is not None, "best_of": best_of_differs})
    constraint = structured_output(body)
    adapter = resolve_model(body.model, base_name)
    logprobs = body.logprobs

    def sampling(j: int) -> SamplingParams:
        return sampling_params(body, body.max_tokens, logprobs, j, constraint)

    return _parsed(body, _prompts(body.prompt), adapter, base_name, sampling, tenant, new_id, logprobs, limits)


def _num_prompts(prompt: Any) -> int:
    """How many prompts `prompt` holds (one string, one id list, or a list of either)."""
    if isinstance(prompt, str) or not prompt or all(isinstance(p, int) for p in prompt):
        return 1
    return len(prompt)


def _prompts(prompt: Any) -> list[dict[str, Any]]:
    if isinstance(prompt, str):
        return [{"prompt": prompt}]
    if not prompt:
        raise bad_request("prompt", "prompt must not be empty")
    if all(isinstance(p, int) for p in prompt):
        return [{"prompt_token_ids": tuple(prompt)}]
    if all(isinstance(p, str) for p in prompt):
        return [{"prompt": p} for p in prompt]
    return [{"prompt_token_ids": tuple(p)} for p in prompt]


def chat_request(data: Any, base_name: str, tenant: str | None, limits: RequestLimits,
                 new_id: Callable[[], str], setup: ChatSetup | None = None,
                 front: FrontLimits | None = None) -> ParsedRequest:
    setup = setup or ChatSetup(HermesFormat())
    body: ChatCompletionRequest = parse_body(ChatCompletionRequest, data)
    if front is not None:
        front.check_choices(1, body.n or 1)
    _refuse_unknown(body, {}, CHAT_EXTRAS)
    extras = body.extras()
    tools = tool_request(extras)
    constraint = structured_output(body)
    forced = tools.constraint(setup.fmt) if tools is not None else None
    if forced is not None and constraint is not None:
        raise bad_request("tool_choice", f"tool_choice {tools.choice!r} forces a tool call; it cannot be combined "
                                         "with response_format / structured outputs")
    constraint = forced or constraint
    chat = chat_options(extras, body.messages, tools, setup.fmt, setup.admin)
    adapter = resolve_model(body.model, base_name)
    if body.top_logprobs and not body.logprobs:
        raise bad_request("top_logprobs", "top_logprobs needs logprobs: true")
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    messages = chat_messages(body.messages)
    skip_special = not keeps_special_tokens(setup.fmt, tools)

    def sampling(j: int) -> SamplingParams:
        return sampling_params(body, max_tokens, logprobs, j, constraint, skip_special)

    return _parsed(body, [{"messages": messages, "chat": chat}], adapter, base_name, sampling, tenant, new_id,
                   logprobs, limits, ChatShaper(setup.fmt, tools, setup.reasoning_parser))


def chat_messages(messages: list[ChatMessage]) -> tuple[tuple[str, str], ...]:
    """OpenAI messages -> (role, content) pairs; text parts are joined, other parts refused
    (tool calls and tool_call_id travel in ChatOptions.message_fields: tools.py)."""
    pairs = []
    for index, message in enumerate(messages):
        role = CHAT_ROLES.get(message.role)
        if role is None:
            raise bad_request(f"messages.{index}.role", f"role {message.role!r} is not supported "
                                                        f"(use one of {', '.join(CHAT_ROLES)})")
        pairs.append((role, _text(message.content, index)))
    return tuple(pairs)


def _text(content: Any, index: int) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for part_index, part in enumerate(content):
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise bad_request(f"messages.{index}.content.{part_index}",
                              f"only text content parts are supported (got type {part.get('type')!r})")
        texts.append(part["text"])
    return "".join(texts)

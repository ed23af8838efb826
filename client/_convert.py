"""Conversions between loraplex.v1 protobuf messages and the SDK's dataclasses."""

from __future__ import annotations

import json
from datetime import timezone
from typing import Any, Iterable, Mapping

from grpc_health.v1 import health_pb2

from ..v1 import adapters_pb2, generation_pb2, server_pb2
from ._channel import REPLICA_METADATA_KEY
from ._chat import chat_input, tool_calls
from .errors import ValidationError
from .types import (AdapterInfo, AdapterState, ChatMessage, FinishReason, Generation, GenerationChunk,
                    HealthStatus, Limits, ServerInfo, Timing, Usage)

_FINISH = {generation_pb2.FINISH_REASON_LENGTH: FinishReason.LENGTH,
           generation_pb2.FINISH_REASON_EOS: FinishReason.EOS,
           generation_pb2.FINISH_REASON_STOP: FinishReason.STOP,
           generation_pb2.FINISH_REASON_TOOL_CALLS: FinishReason.TOOL_CALLS}
_STATE = {adapters_pb2.ADAPTER_STATE_READY: AdapterState.READY,
          adapters_pb2.ADAPTER_STATE_QUARANTINED: AdapterState.QUARANTINED,
          adapters_pb2.ADAPTER_STATE_DELETING: AdapterState.DELETING}
CONSTRAINT_KEYS = ("json_schema", "json_object", "regex", "choice", "grammar")
SAMPLING_FIELDS = (frozenset(generation_pb2.SamplingParams.DESCRIPTOR.fields_by_name) - {"constraint"}
                   | frozenset(CONSTRAINT_KEYS))
_ROLES = ("system", "user", "assistant")


# ---- requests --------------------------------------------------------------------------------
def sampling_params(options: Mapping[str, Any]) -> generation_pb2.SamplingParams:
    """SamplingParams from keyword arguments; None values are left unset (server default)."""
    unknown = sorted(set(options) - SAMPLING_FIELDS)
    if unknown:
        raise TypeError(f"unknown sampling argument(s) {', '.join(unknown)}; "
                        f"known: {', '.join(sorted(SAMPLING_FIELDS))}")
    values = {name: value for name, value in options.items() if value is not None}
    if values.get("json_object") is False:
        del values["json_object"]
    if isinstance(values.get("stop"), str):
        values["stop"] = [values["stop"]]
    constraint = constraint_message({key: values.pop(key) for key in CONSTRAINT_KEYS if key in values})
    try:
        return generation_pb2.SamplingParams(**values, constraint=constraint)
    except (TypeError, ValueError) as error:
        raise ValidationError(f"invalid sampling arguments: {error}") from None


def constraint_message(given: Mapping[str, Any]) -> generation_pb2.Constraint | None:
    """At most one of json_schema (dict or JSON text), json_object (True), regex, choice (list of
    str), grammar (Lark text) -> a Constraint message, or None when none is given."""
    if not given:
        return None
    if len(given) > 1:
        raise ValidationError(f"give at most one of {', '.join(CONSTRAINT_KEYS)} (got {', '.join(sorted(given))})",
                              violations={key: "only one constraint per request" for key in given})
    (key, value), = given.items()
    if key == "json_schema" and not isinstance(value, str):
        try:
            value = json.dumps(value)
        except (TypeError, ValueError) as error:
            raise ValidationError(f"json_schema is not JSON-serializable: {error}",
                                  violations={"json_schema": "not JSON"}) from None
    if key == "choice":
        if isinstance(value, str) or not all(isinstance(c, str) for c in value):
            raise ValidationError("choice must be a list of strings", violations={"choice": "not a list of str"})
        return generation_pb2.Constraint(choice=generation_pb2.ChoiceList(choices=list(value)))
    if key == "json_object":
        return generation_pb2.Constraint(json_object=True)
    if not isinstance(value, str):
        raise ValidationError(f"{key} must be a str", violations={key: f"got {type(value).__name__}"})
    return generation_pb2.Constraint(**{key: value})


def chat_messages(messages: Iterable[ChatMessage]) -> generation_pb2.ChatMessages:
    """ChatMessages from dicts {"role", "content"} or (role, content) tuples."""
    converted = []
    for index, message in enumerate(messages):
        if isinstance(message, Mapping):
            role, content = message.get("role"), message.get("content")
        elif isinstance(message, (tuple, list)) and len(message) == 2:
            role, content = message
        else:
            raise ValidationError(f"messages[{index}] must be {{'role': ..., 'content': ...}} or (role, content)",
                                  violations={f"messages[{index}]": "not a chat message"})
        if role not in _ROLES or not isinstance(content, str):
            raise ValidationError(f"messages[{index}] needs a role in {_ROLES} and a string content",
                                  violations={f"messages[{index}]": f"role={role!r}, content type "
                                                                    f"{type(content).__name__}"})
        converted.append(generation_pb2.ChatMessage(role=role, content=content))
    if not converted:
        raise ValidationError("messages is empty: give at least one chat message",
                              violations={"messages": "empty"})
    return generation_pb2.ChatMessages(messages=converted)


def check_adapter_id(adapter_id: str | None) -> None:
    """ValidationError for an id request metadata cannot carry (the id is also the fleet's routing
    key, sent as metadata): the server's rule allows only printable ASCII. Other bad ids are the
    server's to refuse, with the same ValidationError."""
    if adapter_id is None:
        return
    if not isinstance(adapter_id, str) or not (adapter_id.isascii() and adapter_id.isprintable()):
        rule = "must be 'name' or 'name@version' with name matching [A-Za-z0-9][A-Za-z0-9._-]{0,127}"
        raise ValidationError(f"invalid request: adapter_id: {rule}", violations={"adapter_id": rule})


def generation_input(prompt: str | None, messages: Iterable[ChatMessage] | None, adapter_id: str | None,
                     options: Mapping[str, Any], chat: Mapping[str, Any] | None = None) -> generation_pb2.GenerationInput:
    """chat: tools, tool_choice, parallel_tool_calls, chat_template_kwargs (_chat.py)."""
    check_adapter_id(adapter_id)
    sampling = sampling_params(options)
    if messages is not None:
        chat_message = chat_input(messages, **chat) if chat and any(v is not None for v in chat.values()) \
            else chat_messages(messages)
        return generation_pb2.GenerationInput(chat=chat_message, adapter_id=adapter_id or "", sampling=sampling)
    if not isinstance(prompt, str):
        raise ValidationError(f"prompt must be a str, not {type(prompt).__name__}", violations={"prompt": "not a str"})
    return generation_pb2.GenerationInput(prompt=prompt, adapter_id=adapter_id or "", sampling=sampling)


# ---- responses -------------------------------------------------------------------------------
def _usage(message: generation_pb2.Usage) -> Usage:
    return Usage(prompt_tokens=message.prompt_tokens, generated_tokens=message.generated_tokens,
                 cached_tokens=message.cached_tokens)


def _timing(message: generation_pb2.Timing) -> Timing:
    return Timing(queue_seconds=message.queue_seconds, first_token_seconds=message.first_token_seconds,
                  total_seconds=message.total_seconds)


def generation(response: generation_pb2.GenerateResponse, trailers: Iterable[tuple[str, Any]] = ()) -> Generation:
    return Generation(
        text=response.text, token_ids=list(response.token_ids), finish_reason=_FINISH.get(response.finish_reason),
        usage=_usage(response.usage), timing=_timing(response.timing), adapter_id=response.adapter_id or None,
        logprobs=list(response.logprobs) or None, top_logprobs=_top_logprobs(response),
        replica=replica_of(trailers), tool_calls=tool_calls(response),
        reasoning_content=response.reasoning_content or None)


def _top_logprobs(response) -> list[list[tuple[int, float]]] | None:
    found = [[(alt.token_id, alt.logprob) for alt in top.alternatives] for top in response.top_logprobs]
    return found or None


def replica_of(trailers: Iterable[tuple[str, Any]] | None) -> str | None:
    """The `loraplex-replica` value of a call's trailing metadata, if any."""
    for key, value in trailers or ():
        if key == REPLICA_METADATA_KEY:
            return value.decode() if isinstance(value, bytes) else str(value)
    return None


def generation_chunk(response: generation_pb2.GenerateStreamResponse) -> GenerationChunk:
    last = response.finish_reason != generation_pb2.FINISH_REASON_UNSPECIFIED
    return GenerationChunk(
        text=response.text, token_ids=list(response.token_ids), finish_reason=_FINISH.get(response.finish_reason),
        usage=_usage(response.usage) if last else None, timing=_timing(response.timing) if last else None,
        adapter_id=response.adapter_id or None, logprobs=list(response.logprobs) or None,
        top_logprobs=_top_logprobs(response), tool_calls=tool_calls(response),
        reasoning_content=response.reasoning_content or None)


def adapter_info(message: adapters_pb2.AdapterInfo, versions: Iterable[int] = ()) -> AdapterInfo:
    created = message.created_at.ToDatetime(tzinfo=timezone.utc) if message.HasField("created_at") else None
    return AdapterInfo(
        adapter_id=message.adapter_id, version=message.version, sha256=message.sha256,
        size_bytes=message.size_bytes, rank=message.rank, lora_alpha=message.lora_alpha,
        use_rslora=message.use_rslora, target_modules=list(message.target_modules), dtype=message.dtype,
        peft_type=message.peft_type, base_model=message.base_model, base_fingerprint=message.base_fingerprint,
        owner=message.owner or None, created_at=created,
        state=_STATE.get(message.state, AdapterState.UNSPECIFIED), versions=list(versions),
        has_chat_template=message.has_chat_template, vocab_size=message.vocab_size or None)


def server_info(response: server_pb2.InfoResponse) -> ServerInfo:
    limits = response.limits
    return ServerInfo(
        version=response.version, model=response.model, architecture=response.architecture,
        quantization=response.quantization, dtype=response.dtype, base_fingerprint=response.base_fingerprint,
        limits=Limits(**{name: getattr(limits, name) for name in Limits.__dataclass_fields__}),
        auth_enabled=response.auth_enabled, device=response.device,
        linear_weight_bytes=response.linear_weight_bytes,
        linear_kernels=tuple(response.linear_kernels), cpu_isa=response.cpu_isa,
        decode_path=response.decode_path)


def health_status(response: health_pb2.HealthCheckResponse) -> HealthStatus:
    return HealthStatus(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))

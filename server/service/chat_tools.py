"""gRPC chat requests with tools, tool calls in the history and template options
(ChatMessages fields 2-7, ChatMessage fields 3-5) -> the engine's ChatOptions and the
constraint that forces calls; and the output side: tool calls and reasoning moved out of
`text` into GenerateResponse / GenerateStreamResponse `tool_calls` and `reasoning_content`
(the same parsers as the HTTP API: engine/tool_parsers)."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any

from ...v1 import generation_pb2 as pb
from ..engine.chat_options import ChatOptions
from ..engine.io import GenerationRequest, RequestOutput
from ..engine.tool_parsers import keeps_special_tokens, pick_format
from ..engine.tool_parsers.request import ToolRequest, ToolRequestError, checked_tools
from ..engine.tool_parsers.shaper import ChatShaper
from .errors import FieldViolation, invalid_argument

_FINISH_NAMES = {pb.FINISH_REASON_EOS: "stop", pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length"}


@dataclass
class ChatTools:
    """What one gRPC chat request set up; `shaper` None = the output text as it is."""

    shaper: ChatShaper | None = None


def _bad(field: str, message: str) -> Exception:
    return invalid_argument([FieldViolation(f"input.chat.{field}", message)])


def _tools(chat: pb.ChatMessages) -> ToolRequest | None:
    tools = []
    for index, tool in enumerate(chat.tools):
        try:
            parameters = json.loads(tool.parameters) if tool.parameters else {"type": "object", "properties": {}}
        except ValueError:
            raise _bad(f"tools[{index}].parameters", "must be a JSON Schema object's text") from None
        function = {"name": tool.name, "parameters": parameters}
        if tool.description:
            function["description"] = tool.description
        tools.append({"type": "function", "function": function})
    choice: Any = chat.tool_choice or None
    if choice not in (None, "auto", "none", "required"):
        choice = {"type": "function", "function": {"name": choice}}
    parallel = chat.parallel_tool_calls if chat.HasField("parallel_tool_calls") else None
    try:
        return checked_tools(tools, choice, parallel)
    except ToolRequestError as error:
        raise _bad(_wire(error.param), error.message) from None


def _wire(param: str) -> str:
    """OpenAI's field names ("tools.0.function.parameters") -> this API's ("tools[0].parameters")."""
    parts = param.split(".")
    if parts[0] != "tools" or len(parts) < 2:
        return param
    return f"tools[{parts[1]}]" + "".join("." + part for part in parts[2:] if part != "function")


def _fields(chat: pb.ChatMessages) -> tuple[str, ...]:
    fields = []
    for index, message in enumerate(chat.messages):
        found: dict[str, Any] = {}
        if message.tool_calls:
            if message.role != "assistant":
                raise _bad(f"messages[{index}].tool_calls", "only assistant messages carry tool_calls")
            calls = []
            for k, call in enumerate(message.tool_calls):
                try:
                    arguments = json.loads(call.arguments or "{}")
                except ValueError:
                    arguments = None
                if not isinstance(arguments, dict):
                    raise _bad(f"messages[{index}].tool_calls[{k}].arguments", "must be a JSON object's text")
                calls.append({"id": call.id or f"call_{index}_{k}", "type": "function",
                              "function": {"name": call.name, "arguments": json.dumps(arguments)}})
            found["tool_calls"] = calls
        if message.role == "tool":
            if not message.tool_call_id:
                raise _bad(f"messages[{index}].tool_call_id", "a tool message needs the tool_call_id it answers")
            found["tool_call_id"] = message.tool_call_id
        if message.name:
            found["name"] = message.name
        fields.append(json.dumps(found) if found else "")
    return tuple(fields)


def with_chat_tools(request: GenerationRequest, message: pb.GenerationInput, config: Any,
                    chat_template: str) -> tuple[GenerationRequest, ChatTools]:
    """The request with its ChatOptions (and the forcing constraint); INVALID_ARGUMENT naming the field."""
    if message.WhichOneof("input") != "chat":
        return request, ChatTools()
    chat = message.chat
    fmt = pick_format(config.tool_call_parser, chat_template)
    tools = _tools(chat)
    kwargs = chat.chat_template_kwargs
    if kwargs:
        try:
            if not isinstance(json.loads(kwargs), dict):
                raise ValueError
        except ValueError:
            raise _bad("chat_template_kwargs", "must be a JSON object's text") from None
    fields = _fields(chat)
    options = ChatOptions(
        message_fields=fields if any(fields) else (), tools=json.dumps(list(tools.tools)) if tools else "",
        template_kwargs=kwargs, tool_format=fmt.name, continue_final_message=chat.continue_final_message,
        add_generation_prompt=chat.add_generation_prompt if chat.HasField("add_generation_prompt")
        else not chat.continue_final_message)
    forced = tools.constraint(fmt) if tools is not None else None
    if forced is not None and request.sampling.constraint is not None:
        raise _bad("tool_choice", "a forced tool call cannot be combined with sampling.constraint")
    if forced is not None:
        request = replace(request, sampling=replace(request.sampling, constraint=forced))
    if keeps_special_tokens(fmt, tools) and not message.sampling.HasField("skip_special_tokens"):
        request = replace(request, sampling=replace(request.sampling, skip_special_tokens=False))
    if options != ChatOptions(tool_format=fmt.name):
        request = replace(request, chat=options)
    shaper = ChatShaper(fmt, tools, config.reasoning_parser)
    return request, ChatTools(shaper if shaper.active else None)


def _calls(entries: list[dict]) -> list[pb.ToolCall]:
    return [pb.ToolCall(id=e["id"], name=e["function"]["name"], arguments=e["function"]["arguments"]) for e in entries]


def shape_unary(response: pb.GenerateResponse, tools: ChatTools) -> pb.GenerateResponse:
    """Move tool calls / reasoning out of `text` (FINISH_REASON_TOOL_CALLS after calls)."""
    if tools.shaper is None:
        return response
    message, reason = tools.shaper.message(0, response.text, _FINISH_NAMES.get(response.finish_reason))
    response.text = message.get("content") or ""
    response.reasoning_content = message.get("reasoning_content") or ""
    response.tool_calls.extend(_calls(message.get("tool_calls") or []))
    if reason == "tool_calls":
        response.finish_reason = pb.FINISH_REASON_TOOL_CALLS
    return response


def shape_stream(response: pb.GenerateStreamResponse, output: RequestOutput,
                 tools: ChatTools) -> pb.GenerateStreamResponse:
    if tools.shaper is None:
        return response
    delta, reason = tools.shaper.delta(0, output.text, output.finished, _FINISH_NAMES.get(response.finish_reason))
    response.text = delta.get("content", "")
    response.reasoning_content = delta.get("reasoning_content", "")
    response.tool_calls.extend(_calls(delta.get("tool_calls") or []))
    if reason == "tool_calls":
        response.finish_reason = pb.FINISH_REASON_TOOL_CALLS
    return response

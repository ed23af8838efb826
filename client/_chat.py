"""Chat requests with tools (SDK side): messages with tool calls and tool results, tool
definitions, tool_choice, chat_template_kwargs -> ChatMessages; tool calls back out."""

from __future__ import annotations

import json
from typing import Any, Iterable, Mapping

from ..v1 import generation_pb2
from .errors import ValidationError
from .types import ToolCall

_ROLES = ("system", "user", "assistant", "tool")


def _bad(field: str, message: str) -> ValidationError:
    return ValidationError(f"{field}: {message}", violations={field: message})


def _call(call: Any, where: str) -> generation_pb2.ToolCall:
    """A ToolCall, {"id", "name", "arguments"} or OpenAI's {"id", "function": {"name", "arguments"}}."""
    if isinstance(call, ToolCall):
        return generation_pb2.ToolCall(id=call.id, name=call.name, arguments=call.arguments)
    if not isinstance(call, Mapping):
        raise _bad(where, "a tool call is a ToolCall or a dict")
    function = call.get("function") if isinstance(call.get("function"), Mapping) else call
    arguments = function.get("arguments", "{}")
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments)
    return generation_pb2.ToolCall(id=str(call.get("id", "")), name=str(function.get("name", "")), arguments=arguments)


def _message(message: Any, index: int) -> generation_pb2.ChatMessage:
    where = f"messages[{index}]"
    if isinstance(message, (tuple, list)) and len(message) == 2:
        message = {"role": message[0], "content": message[1]}
    if not isinstance(message, Mapping):
        raise _bad(where, "must be {'role': ..., 'content': ...} or (role, content)")
    role, content = message.get("role"), message.get("content")
    content = "" if content is None and (message.get("tool_calls") or role == "tool") else content
    if role not in _ROLES or not isinstance(content, str):
        raise _bad(where, f"needs a role in {_ROLES} and a string content (role={role!r}, "
                          f"content type {type(content).__name__})")
    calls = [_call(call, f"{where}.tool_calls[{k}]") for k, call in enumerate(message.get("tool_calls") or [])]
    return generation_pb2.ChatMessage(role=role, content=content, tool_calls=calls,
                                      tool_call_id=message.get("tool_call_id") or "", name=message.get("name") or "")


def _tool(tool: Any, index: int) -> generation_pb2.Tool:
    """OpenAI's {"type": "function", "function": {...}} or a bare {"name", "description", "parameters"}."""
    function = tool.get("function", tool) if isinstance(tool, Mapping) else None
    if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
        raise _bad(f"tools[{index}]", "a tool is {'name': ..., 'parameters': {...}} (or OpenAI's function tool)")
    parameters = function.get("parameters")
    return generation_pb2.Tool(name=function["name"], description=function.get("description") or "",
                               parameters=json.dumps(parameters) if parameters is not None else "")


def chat_input(messages: Iterable[Any], tools: Iterable[Any] | None = None, tool_choice: Any = None,
               parallel_tool_calls: bool | None = None,
               chat_template_kwargs: Mapping[str, Any] | None = None) -> generation_pb2.ChatMessages:
    converted = [_message(message, index) for index, message in enumerate(messages)]
    if not converted:
        raise _bad("messages", "give at least one chat message")
    chat = generation_pb2.ChatMessages(messages=converted, tools=[_tool(t, i) for i, t in enumerate(tools or [])])
    if isinstance(tool_choice, Mapping):
        tool_choice = (tool_choice.get("function") or tool_choice).get("name")
    if tool_choice is not None:
        chat.tool_choice = str(tool_choice)
    if parallel_tool_calls is not None:
        chat.parallel_tool_calls = bool(parallel_tool_calls)
    if chat_template_kwargs:
        chat.chat_template_kwargs = json.dumps(dict(chat_template_kwargs))
    return chat


def tool_calls(response: Any) -> list[ToolCall]:
    return [ToolCall(id=c.id, name=c.name, arguments=c.arguments) for c in response.tool_calls]

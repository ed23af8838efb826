"""The chat request's agent fields -> engine inputs: `tools`, `tool_choice`,
`parallel_tool_calls`, tool calls and results in the history, and the chat-template options
(`chat_template_kwargs`, `add_generation_prompt`, `continue_final_message`, `documents`,
`chat_template` for admin keys) -> a ChatOptions; tool_choice "required" or a named function
-> the Constraint that forces a valid call in the `--tool-call-parser` format.
"""

from __future__ import annotations

import json
from typing import Any

from ..engine.chat_options import ChatOptions
from ..engine.tool_parsers import ToolFormat
from ..engine.tool_parsers.request import ToolRequest, ToolRequestError, checked_tools
from .errors import bad_request

CHAT_EXTRAS = ("tools", "tool_choice", "parallel_tool_calls", "chat_template_kwargs", "add_generation_prompt",
               "continue_final_message", "documents", "chat_template")


def tool_request(extras: dict[str, Any]) -> ToolRequest | None:
    """The request's tools (None: no tools, or tool_choice "none"); 400 naming the field otherwise."""
    try:
        return checked_tools(extras.get("tools"), extras.get("tool_choice"), extras.get("parallel_tool_calls"))
    except ToolRequestError as error:
        raise bad_request(error.param, error.message) from None


def message_fields(messages: list[Any]) -> tuple[str, ...]:
    """Per message, the JSON of its tool fields (assistant tool_calls, tool's tool_call_id, name)."""
    fields = []
    for index, message in enumerate(messages):
        extra = dict(message.model_extra or {})
        if extra.get("function_call"):
            raise bad_request(f"messages.{index}.function_call", "function_call is not supported; use tool_calls")
        found: dict[str, Any] = {}
        calls = extra.get("tool_calls")
        if calls:
            if message.role != "assistant":
                raise bad_request(f"messages.{index}.tool_calls", "only assistant messages carry tool_calls")
            found["tool_calls"] = [_history_call(call, index, k) for k, call in enumerate(calls)]
        if message.role == "tool":
            if not isinstance(extra.get("tool_call_id"), str):
                raise bad_request(f"messages.{index}.tool_call_id", "a tool message needs the tool_call_id it answers")
            found["tool_call_id"] = extra["tool_call_id"]
        if message.name is not None:
            found["name"] = message.name
        fields.append(json.dumps(found, ensure_ascii=False) if found else "")
    return tuple(fields)


def _history_call(call: Any, index: int, k: int) -> dict:
    where = f"messages.{index}.tool_calls.{k}"
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise bad_request(where, f"{where} must be {{\"id\": ..., \"type\": \"function\", \"function\": "
                                 "{\"name\": ..., \"arguments\": \"{...}\"}}")
    arguments = function.get("arguments", "{}")
    try:
        parsed = json.loads(arguments) if isinstance(arguments, str) else arguments
    except ValueError:
        raise bad_request(f"{where}.function.arguments", "arguments must be a JSON object's text") from None
    if not isinstance(parsed, dict):
        raise bad_request(f"{where}.function.arguments", "arguments must be a JSON object's text")
    return {"id": str(call.get("id", f"call_{index}_{k}")), "type": "function",
            "function": {"name": function["name"], "arguments": json.dumps(parsed, ensure_ascii=False)}}


def chat_options(extras: dict[str, Any], messages: list[Any], tools: ToolRequest | None, fmt: ToolFormat,
                 admin: bool) -> ChatOptions | None:
    """The template options of a chat request (None: a plain chat, rendered as before)."""
    fields = message_fields(messages)
    kwargs = extras.get("chat_template_kwargs")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise bad_request("chat_template_kwargs", "chat_template_kwargs must be an object")
    documents = extras.get("documents")
    if documents is not None and (not isinstance(documents, list) or not all(isinstance(d, dict) for d in documents)):
        raise bad_request("documents", "documents must be a list of objects (e.g. {\"title\": ..., \"text\": ...})")
    flags = {}
    for name in ("add_generation_prompt", "continue_final_message"):
        if extras.get(name) is not None and not isinstance(extras[name], bool):
            raise bad_request(name, f"{name} must be a boolean")
    template = extras.get("chat_template")
    if template is not None:
        if not isinstance(template, str) or not template.strip():
            raise bad_request("chat_template", "chat_template must be a Jinja template's text")
        if not admin:
            raise bad_request("chat_template", "a request's own chat_template needs an admin key "
                                               "(templates are code)")
    continuing = bool(extras.get("continue_final_message"))
    flags["add_generation_prompt"] = extras.get("add_generation_prompt", not continuing) is not False
    flags["continue_final_message"] = continuing
    options = ChatOptions(
        message_fields=fields if any(fields) else (), tools=json.dumps(list(tools.tools)) if tools else "",
        documents=json.dumps(documents) if documents else "",
        template_kwargs=json.dumps(kwargs) if kwargs else "", chat_template=template or "",
        tool_format=fmt.name, **flags)
    return None if options == ChatOptions(tool_format=fmt.name) else options

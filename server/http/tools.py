"""The chat request's agent fields -> engine inputs: `tools`, `tool_choice`,
`parallel_tool_calls`, tool calls and results in the history, and the chat-template options
(`chat_template_kwargs`, `add_generation_prompt`, `continue_final_message`, `documents`,
`chat_template` for admin keys) -> a ChatOptions; tool_choice "required" or a named function
-> the Constraint that forces a valid call in the `--tool-call-parser` format.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from ..engine.chat_options import ChatOptions
from ..engine.constraints.spec import Constraint
from ..engine.tool_parsers import ToolCall, ToolFormat
from .errors import bad_request

CHAT_EXTRAS = ("tools", "tool_choice", "parallel_tool_calls", "chat_template_kwargs", "add_generation_prompt",
               "continue_final_message", "documents", "chat_template")
NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}", re.ASCII)       # OpenAI's function name rule
MAX_PARALLEL_CALLS = 8                                         # calls one forced answer may hold


@dataclass(frozen=True)
class ToolRequest:
    """A request's tools and how it lets the model use them."""

    tools: tuple[dict, ...]             # OpenAI tool definitions as sent
    parameters: dict[str, dict]         # function name -> its JSON Schema
    choice: str                         # "none" | "auto" | "required" | "function"
    function: str | None                # the named function when choice == "function"
    parallel: bool

    def accepts(self, call: ToolCall) -> bool:
        """A call of a known function whose arguments validate against its schema."""
        import jsonschema

        schema = self.parameters.get(call.name)
        if schema is None or (self.choice == "function" and call.name != self.function):
            return False
        try:
            jsonschema.validate(json.loads(call.arguments), schema)
        except (ValueError, jsonschema.ValidationError, jsonschema.SchemaError):
            return False
        return True

    def constraint(self, fmt: ToolFormat) -> Constraint | None:
        """The grammar forcing calls ("required": any tool, a named function: that one); None otherwise."""
        if self.choice not in ("required", "function"):
            return None
        names = [self.function] if self.choice == "function" else list(self.parameters)
        calls = MAX_PARALLEL_CALLS if self.parallel and self.choice == "required" else 1
        return Constraint("grammar", fmt.grammar([(n, self.parameters[n]) for n in names], calls))


def tool_request(extras: dict[str, Any]) -> ToolRequest | None:
    """The request's tools (None: no tools, or tool_choice "none"); 400 naming the field otherwise."""
    tools = extras.get("tools") or []
    if not isinstance(tools, list):
        raise bad_request("tools", "tools must be a list of {\"type\": \"function\", \"function\": {...}}")
    parameters = {}
    for index, tool in enumerate(tools):
        name, schema = _function(tool, index)
        if name in parameters:
            raise bad_request(f"tools.{index}.function.name", f"two tools are named {name!r}")
        parameters[name] = schema
    choice, function = _choice(extras.get("tool_choice"), parameters)
    parallel = extras.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise bad_request("parallel_tool_calls", "parallel_tool_calls must be a boolean")
    if not tools or choice == "none":
        return None
    return ToolRequest(tuple(tools), parameters, choice, function, parallel is not False)


def _function(tool: Any, index: int) -> tuple[str, dict]:
    import jsonschema

    where = f"tools.{index}"
    if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
        raise bad_request(where, f"{where} must be {{\"type\": \"function\", \"function\": {{\"name\": ...}}}} "
                                 "(only function tools are supported)")
    function = tool["function"]
    name = function.get("name")
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise bad_request(f"{where}.function.name", "a function name is 1 to 64 of a-z, A-Z, 0-9, _, . and -")
    schema = function.get("parameters", {"type": "object", "properties": {}})
    if not isinstance(schema, dict):
        raise bad_request(f"{where}.function.parameters", "parameters must be a JSON Schema object")
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as error:
        raise bad_request(f"{where}.function.parameters",
                          f"the parameters of {name!r} are not a valid JSON Schema: {error.message}") from None
    return name, schema


def _choice(value: Any, parameters: dict[str, dict]) -> tuple[str, str | None]:
    if value is None:
        return ("auto" if parameters else "none"), None
    if value in ("none", "auto", "required"):
        if value == "required" and not parameters:
            raise bad_request("tool_choice", "tool_choice 'required' needs tools")
        return value, None
    if isinstance(value, dict) and value.get("type") == "function" and isinstance(value.get("function"), dict):
        name = value["function"].get("name")
        if name not in parameters:
            raise bad_request("tool_choice", f"tool_choice names the function {name!r}, which is not in tools "
                                             f"({', '.join(parameters) or 'none given'})")
        return "function", name
    raise bad_request("tool_choice", "tool_choice must be 'none', 'auto', 'required' or "
                                     "{\"type\": \"function\", \"function\": {\"name\": ...}}")


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

"""A request's tools and tool_choice, checked (function names, parameter schemas that compile,
a named function that exists) -> ToolRequest: which calls to accept from the model's text,
and the grammar that forces calls for tool_choice "required" / a named function. Front ends
map ToolRequestError's `param` (OpenAI's names: "tools.0.function.parameters") onto their own.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from ..constraints.spec import Constraint
from .base import ToolCall, ToolFormat

NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}", re.ASCII)       # OpenAI's function name rule
MAX_PARALLEL_CALLS = 8                                         # calls one forced answer may hold


class ToolRequestError(ValueError):
    """A problem with the tools of a request; `param` names the field (OpenAI's names)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param
        self.message = message


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


def checked_tools(tools: Any, tool_choice: Any, parallel: Any) -> ToolRequest | None:
    """OpenAI's tools / tool_choice / parallel_tool_calls, checked (None: no tools, or tool_choice
    "none"); ToolRequestError naming the field otherwise."""
    tools = tools or []
    if not isinstance(tools, list):
        raise ToolRequestError("tools", "tools must be a list of {\"type\": \"function\", \"function\": {...}}")
    parameters = {}
    for index, tool in enumerate(tools):
        name, schema = _function(tool, index)
        if name in parameters:
            raise ToolRequestError(f"tools.{index}.function.name", f"two tools are named {name!r}")
        parameters[name] = schema
    choice, function = _choice(tool_choice, parameters)
    if parallel is not None and not isinstance(parallel, bool):
        raise ToolRequestError("parallel_tool_calls", "parallel_tool_calls must be a boolean")
    if not tools or choice == "none":
        return None
    return ToolRequest(tuple(tools), parameters, choice, function, parallel is not False)


def _function(tool: Any, index: int) -> tuple[str, dict]:
    import jsonschema

    where = f"tools.{index}"
    if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
        raise ToolRequestError(where, f"{where} must be {{\"type\": \"function\", \"function\": {{\"name\": ...}}}} "
                                 "(only function tools are supported)")
    function = tool["function"]
    name = function.get("name")
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise ToolRequestError(f"{where}.function.name", "a function name is 1 to 64 of a-z, A-Z, 0-9, _, . and -")
    schema = function.get("parameters", {"type": "object", "properties": {}})
    if not isinstance(schema, dict):
        raise ToolRequestError(f"{where}.function.parameters", "parameters must be a JSON Schema object")
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as error:
        raise ToolRequestError(f"{where}.function.parameters",
                          f"the parameters of {name!r} are not a valid JSON Schema: {error.message}") from None
    return name, schema


def _choice(value: Any, parameters: dict[str, dict]) -> tuple[str, str | None]:
    if value is None:
        return ("auto" if parameters else "none"), None
    if value in ("none", "auto", "required"):
        if value == "required" and not parameters:
            raise ToolRequestError("tool_choice", "tool_choice 'required' needs tools")
        return value, None
    if isinstance(value, dict) and value.get("type") == "function" and isinstance(value.get("function"), dict):
        name = value["function"].get("name")
        if name not in parameters:
            raise ToolRequestError("tool_choice", f"tool_choice names the function {name!r}, which is not in tools "
                                             f"({', '.join(parameters) or 'none given'})")
        return "function", name
    raise ToolRequestError("tool_choice", "tool_choice must be 'none', 'auto', 'required' or "
                                     "{\"type\": \"function\", \"function\": {\"name\": ...}}")

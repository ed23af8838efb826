"""What every tool-call format shares: the ToolCall a parser finds, the ToolFormat interface
(how calls look in the model's text, how to read them, how to write them back into a prompt,
and the grammar that forces them), and the JSON helpers the formats use."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class ToolCall:
    """One function call the model wrote: its name and its arguments as JSON text."""

    name: str
    arguments: str            # a JSON object's text


@dataclass(frozen=True)
class Scan:
    """How far a format reads its tool-call section of `text` so far.

    calls: the complete calls found, in order; `None` in place of a call that is complete
    but malformed (its raw text is in `raw`, same index). consumed: characters of the section
    that those calls cover; the rest is an incomplete call still being written.
    """

    calls: tuple[ToolCall | None, ...]
    raw: tuple[str, ...]
    consumed: int


class ToolFormat(Protocol):
    """One model family's tool-call syntax (hermes, llama3_json, mistral)."""

    name: str
    markers: tuple[str, ...]        # text that opens the tool-call section ("" = only at the very start)
    continuations: tuple[str, ...]  # text that, after a call, starts another one

    def scan(self, section: str) -> Scan:
        """Read the complete calls at the start of `section` (which begins at a marker)."""
        ...

    def write(self, calls: list[ToolCall]) -> str:
        """The calls as the model would write them (for prompts whose template has no tool support)."""
        ...

    def grammar(self, functions: list[tuple[str, dict]], max_calls: int) -> str:
        """A Lark grammar (llguidance dialect) of 1..max_calls calls of these (name, parameters) functions."""
        ...


# JSON in a forced call is written in the usual one-line style (see constraints/compiler.py).
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def call_schema(name: str, parameters: dict, arguments_key: str) -> dict:
    """The JSON Schema of one call object {"name": name, <arguments_key>: {...}}."""
    return {"type": "object", "properties": {"name": {"const": name}, arguments_key: parameters or {"type": "object"}},
            "required": ["name", arguments_key], "additionalProperties": False, "x-guidance": JSON_STYLE}


def json_rule(functions: list[tuple[str, dict]], arguments_key: str) -> str:
    """A Lark rule body: one call object of any of the functions."""
    return " | ".join("%json " + json.dumps(call_schema(name, params, arguments_key), ensure_ascii=False)
                      for name, params in functions)


def repeat(rule: str, separator: str, max_calls: int) -> str:
    """`rule (separator rule){0,max_calls-1}` in Lark syntax."""
    if max_calls <= 1:
        return rule
    return f"{rule} ({json.dumps(separator)} {rule}){{0,{max_calls - 1}}}"


def decode_object(text: str, start: int = 0) -> tuple[Any, int] | None:
    """(value, end) of the JSON value at text[start:] (leading whitespace skipped); None if incomplete or invalid."""
    index = start
    while index < len(text) and text[index] in " \t\r\n":
        index += 1
    try:
        value, end = json.JSONDecoder().raw_decode(text, index)
    except (ValueError, RecursionError):
        return None
    return value, end


def as_call(value: Any, arguments_keys: tuple[str, ...] = ("arguments", "parameters")) -> ToolCall | None:
    """A ToolCall from a decoded {"name": ..., "arguments": {...}} object (arguments may be JSON text)."""
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or not value["name"]:
        return None
    arguments = next((value[key] for key in arguments_keys if key in value), {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ToolCall(value["name"], json.dumps(arguments, ensure_ascii=False))

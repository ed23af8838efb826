"""Llama 3.x JSON tool calls: `{"name": ..., "parameters": {...}}` as the whole answer (after
an optional `<|python_tag|>`, a special token the detokenizer drops), several joined by `; `."""

from __future__ import annotations

import json

from .base import Scan, ToolCall, as_call, decode_object, json_rule, repeat

PYTHON_TAG = "<|python_tag|>"


class Llama3JsonFormat:
    name = "llama3_json"
    markers = ("",)            # only an answer that starts with '{' (or the python tag) is a call
    continuations = (";", "{", PYTHON_TAG)

    def scan(self, section: str) -> Scan:
        calls, raws, consumed = [], [], 0
        text = section[len(PYTHON_TAG):] if section.startswith(PYTHON_TAG) else section
        offset = len(section) - len(text)
        while True:
            rest = text[consumed:]
            lead = len(rest) - len(rest.lstrip(" \t\r\n;"))
            if consumed and not rest[:lead].strip(" \t\r\n").startswith(";"):
                break                                  # calls after the first are joined by ';'
            if not rest[lead:].startswith("{"):
                break
            decoded = decode_object(rest, lead)
            if decoded is None:
                break
            value, end = decoded
            calls.append(as_call(value, ("parameters", "arguments")))
            raws.append(rest[lead:end])
            consumed += end
        return Scan(tuple(calls), tuple(raws), consumed + (offset if calls else 0))

    def write(self, calls: list[ToolCall]) -> str:
        return "; ".join(f'{{"name": {json.dumps(c.name)}, "parameters": {c.arguments}}}' for c in calls)

    def grammar(self, functions: list[tuple[str, dict]], max_calls: int) -> str:
        return f"start: {repeat('fn', '; ', max_calls)}\nfn: {json_rule(functions, 'parameters')}\n"

"""Hermes / Qwen: `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`, one block per call."""

from __future__ import annotations

import json

from .base import Scan, ToolCall, as_call, json_rule, repeat

OPEN, CLOSE = "<tool_call>", "</tool_call>"


class HermesFormat:
    name = "hermes"
    markers = (OPEN,)
    continuations = (OPEN,)

    def scan(self, section: str) -> Scan:
        calls, raws, consumed = [], [], 0
        while True:
            rest = section[consumed:]
            stripped = len(rest) - len(rest.lstrip())
            if not rest[stripped:].startswith(OPEN):
                break
            end = rest.find(CLOSE)
            if end < 0:
                break
            body = rest[stripped + len(OPEN):end]
            try:
                call = as_call(json.loads(body))
            except (ValueError, RecursionError):
                call = None
            calls.append(call)
            raws.append(rest[stripped:end + len(CLOSE)])
            consumed += end + len(CLOSE)
        return Scan(tuple(calls), tuple(raws), consumed)

    def write(self, calls: list[ToolCall]) -> str:
        return "\n".join(f'{OPEN}\n{{"name": {json.dumps(c.name)}, "arguments": {c.arguments}}}\n{CLOSE}'
                         for c in calls)

    def grammar(self, functions: list[tuple[str, dict]], max_calls: int) -> str:
        return (f"start: {repeat('call', chr(10), max_calls)}\n"
                f'call: "{OPEN}\\n" fn "\\n{CLOSE}"\n'
                f"fn: {json_rule(functions, 'arguments')}\n")

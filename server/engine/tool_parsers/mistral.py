"""Mistral: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]` (v3 tokenizers), or
`[TOOL_CALLS]name[ARGS]{...}` per call (v11+ tokenizers). Both markers are special tokens in
Mistral's tokenizers, which the detokenizer drops by default: a request with tools is
detokenized with special tokens kept (`special_markers`, tool_parsers.keeps_special_tokens, as
vLLM's Mistral parser does), so the v11 form can be read. A text where the marker was dropped
anyway (skip_special_tokens set by the client) and that starts with `[{` is still read as the v3
call array (`implicit_start`)."""

from __future__ import annotations

import json
import re

from .base import Scan, ToolCall, as_call, decode_object, json_rule, repeat

MARKER, ARGS = "[TOOL_CALLS]", "[ARGS]"
NAME_RE = re.compile(r"\s*([A-Za-z0-9_.-]{1,128})\[ARGS\]")


class MistralFormat:
    name = "mistral"
    markers = (MARKER,)
    special_markers = (MARKER, ARGS)   # special tokens in Mistral's tokenizers: keep them in the text
    implicit_start = "[{"         # what a v3 call array looks like once the special marker is dropped
    continuations = (MARKER,)

    def scan(self, section: str) -> Scan:
        calls, raws, consumed = [], [], 0
        implicit = not section.startswith(MARKER) and section.lstrip().startswith(self.implicit_start)
        while section.startswith(MARKER, consumed) or (implicit and not consumed):
            start = consumed + (0 if implicit and not consumed else len(MARKER))
            found = self._array(section, start) if section[start:].lstrip().startswith("[") \
                else self._named(section, start)
            if found is None:
                break
            new_calls, end, new_raws = found
            calls += new_calls
            raws += new_raws or [section[consumed:end]]
            consumed = end
            consumed += len(section[consumed:]) - len(section[consumed:].lstrip())
        return Scan(tuple(calls), tuple(raws), consumed)

    @staticmethod
    def _array(section: str, start: int) -> tuple[list, int, list[str]] | None:
        """(calls, end, each call's text) of a JSON array of calls."""
        decoded = decode_object(section, start)
        if decoded is None:
            return None
        value, end = decoded
        if not isinstance(value, list) or not value:
            return [None], end, []
        return [as_call(item) for item in value], end, [json.dumps(item, ensure_ascii=False) for item in value]

    @staticmethod
    def _named(section: str, start: int) -> tuple[list, int] | None:
        match = NAME_RE.match(section, start)
        if match is None:
            return None if len(section) - start < 140 and ARGS not in section[start:] else ([None], len(section), [])
        decoded = decode_object(section, match.end())
        if decoded is None:
            return None
        value, end = decoded
        return [as_call({"name": match.group(1), "arguments": value})], end, []

    def write(self, calls: list[ToolCall]) -> str:
        items = ", ".join(f'{{"name": {json.dumps(c.name)}, "arguments": {c.arguments}}}' for c in calls)
        return f"{MARKER}[{items}]"

    def grammar(self, functions: list[tuple[str, dict]], max_calls: int) -> str:
        return (f'start: "{MARKER}[" {repeat("fn", ", ", max_calls)} "]"\n'
                f"fn: {json_rule(functions, 'arguments')}\n")

"""A chat choice's text -> OpenAI's message fields: `reasoning_content` (--reasoning-parser),
`content` and `tool_calls` (--tool-call-parser, when the request has tools), whole for a
response body or delta by delta for a stream. Tool calls are looked for after the reasoning.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

from ..reasoning import ReasoningStream
from .base import ToolCall, ToolFormat
from .request import ToolRequest
from .stream import ToolCallStream


@dataclass
class _Choice:
    reasoning: ReasoningStream | None
    tools: ToolCallStream | None
    num_calls: int = 0
    content: list[str] = field(default_factory=list)
    thought: list[str] = field(default_factory=list)
    calls: list[dict] = field(default_factory=list)


class ChatShaper:
    """Per request, one parser state per choice."""

    def __init__(self, fmt: ToolFormat, tools: ToolRequest | None, reasoning_parser: str):
        self.fmt = fmt
        self.tools = tools
        self.reasoning_parser = reasoning_parser
        self._choices: dict[int, _Choice] = {}

    @property
    def active(self) -> bool:
        return self.tools is not None or bool(self.reasoning_parser)

    def _choice(self, index: int) -> _Choice:
        if index not in self._choices:
            self._choices[index] = _Choice(
                ReasoningStream(self.reasoning_parser) if self.reasoning_parser else None,
                ToolCallStream(self.fmt, self.tools.accepts) if self.tools is not None else None)
        return self._choices[index]

    def feed(self, index: int, text: str, final: bool) -> tuple[str, str, list[dict]]:
        """(content, reasoning_content, new tool_calls entries with their index) of one delta."""
        choice = self._choice(index)
        reasoning = ""
        if choice.reasoning is not None:
            piece = choice.reasoning.feed(text, final)
            reasoning, text = piece.reasoning, piece.content
        calls: list[dict] = []
        if choice.tools is not None:
            found = choice.tools.feed(text, final)
            text = found.content
            for call in found.calls:
                calls.append({"index": choice.num_calls, **_call_entry(call)})
                choice.num_calls += 1
        choice.content.append(text)
        choice.thought.append(reasoning)
        choice.calls += calls
        return text, reasoning, calls

    def finish_reason(self, index: int, reason: str | None) -> str | None:
        """"tool_calls" for a choice that ended normally after calling tools."""
        if reason == "stop" and self._choice(index).num_calls:
            return "tool_calls"
        return reason

    def message(self, index: int, text: str, reason: str | None) -> tuple[dict[str, Any], str | None]:
        """The whole assistant message of a finished choice, and its finish_reason."""
        content, reasoning, calls = self.feed(index, text, final=True)
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if self.reasoning_parser:
            message["reasoning_content"] = reasoning or None
        if calls:
            message["content"] = content if content.strip() else None
            message["tool_calls"] = [{k: v for k, v in call.items() if k != "index"} for call in calls]
        return message, self.finish_reason(index, reason)

    def delta(self, index: int, text: str, final: bool, reason: str | None) -> tuple[dict[str, Any], str | None]:
        """A stream chunk's delta and finish_reason."""
        content, reasoning, calls = self.feed(index, text, final)
        delta: dict[str, Any] = {}
        if reasoning:
            delta["reasoning_content"] = reasoning
        if content and (not calls or content.strip()):
            delta["content"] = content
        if calls:
            delta["tool_calls"] = calls
        return delta, self.finish_reason(index, reason) if final else None


def _call_entry(call: ToolCall) -> dict:
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": call.name, "arguments": call.arguments}}

"""Tool calls out of a model's text, delta by delta (streaming) or all at once.

Text before a format's marker is content; each complete call is checked (`accept`: a known
function with arguments that validate) and then emitted as a ToolCall, or given back as
plain content when it does not parse or validate (never as a broken call). A call is
emitted only once it is complete, so a stream never has to take one back. Text that could
still become a marker is held back until the next delta (or the end) decides.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .base import ToolCall, ToolFormat


@dataclass(frozen=True)
class Piece:
    """What one delta of model text turned into."""

    content: str = ""
    calls: tuple[ToolCall, ...] = ()


def _held_back(text: str, markers: tuple[str, ...]) -> int:
    """Length of the longest suffix of text that is a proper prefix of a marker."""
    longest = 0
    for marker in markers:
        for size in range(min(len(marker) - 1, len(text)), longest, -1):
            if text.endswith(marker[:size]):
                longest = size
                break
    return longest


class ToolCallStream:
    """Feeds model text in; gets content and complete tool calls out."""

    def __init__(self, fmt: ToolFormat, accept: Callable[[ToolCall], bool]):
        self.fmt = fmt
        self.accept = accept
        self.text = ""
        self.done = 0                 # characters of text already turned into output
        self.in_section = False
        self.start_only = fmt.markers == ("",)

    def feed(self, delta: str, final: bool = False) -> Piece:
        self.text += delta
        content: list[str] = []
        calls: list[ToolCall] = []
        while self.done < len(self.text):
            if not self.in_section and not self._enter(content, final):
                break
            if self.in_section and not self._read_section(content, calls, final):
                break
        return Piece("".join(content), tuple(calls))

    def _enter(self, content: list[str], final: bool) -> bool:
        """Move past plain content up to the next marker; True when a section starts."""
        rest = self.text[self.done:]
        if self.start_only:
            if self.done > 0:
                content.append(rest)
                self.done = len(self.text)
                return False
            head = rest.lstrip()
            if not head and not final:
                return False                       # only whitespace so far: wait
            if head.startswith(("{", "<|python_tag|>")):
                self.in_section = True
                return True
            content.append(rest)                   # a plain answer: never a call after this
            self.done = len(self.text)
            return False
        implicit = getattr(self.fmt, "implicit_start", "")
        if implicit and self.done == 0:                 # the marker may be a dropped special token
            head = rest.lstrip()
            if head.startswith(implicit):
                self.in_section = True
                return True
            if implicit.startswith(head) and not final:
                return False                            # "", "[": wait for the next token
        found = [(rest.find(m), m) for m in self.fmt.markers if m and rest.find(m) >= 0]
        if found:
            index = min(found)[0]
            content.append(rest[:index])
            self.done += index
            self.in_section = True
            return True
        keep = 0 if final else _held_back(rest, self.fmt.markers)
        content.append(rest[:len(rest) - keep])
        self.done = len(self.text) - keep
        return False

    def _read_section(self, content: list[str], calls: list[ToolCall], final: bool) -> bool:
        """Take the complete calls; True when the section ended and plain text follows."""
        scan = self.fmt.scan(self.text[self.done:])
        for call, raw in zip(scan.calls, scan.raw):
            if call is not None and self.accept(call):
                calls.append(call)
            else:
                content.append(raw)
        self.done += scan.consumed
        rest = self.text[self.done:]
        head = rest.lstrip()
        implicit = getattr(self.fmt, "implicit_start", "")
        pending = (head.startswith(self.fmt.continuations) or any(m.startswith(head) for m in self.fmt.continuations)
                   or (self.done == 0 and bool(implicit) and head.startswith(implicit)))
        if pending and not final:
            return False                           # the next call is still being written
        if pending and scan.consumed == 0:
            content.append(rest)                   # an unfinished call at the end: plain text
            self.done = len(self.text)
            return False
        self.in_section = False
        return True

"""Reasoning out of a model's text (`--reasoning-parser`): `<think>...</think>` -> the
message's `reasoning_content`, the rest -> `content`, delta by delta or all at once.

    think         reasoning only inside a <think>...</think> the answer starts with (Qwen3, QwQ)
    deepseek_r1   the answer starts inside the reasoning (the template opened <think> in the
                  prompt); everything up to </think> is reasoning (an answer without </think>
                  is all reasoning, as vLLM does)
"""

from __future__ import annotations

from dataclasses import dataclass

OPEN, CLOSE = "<think>", "</think>"
REASONING_PARSERS = ("think", "deepseek_r1")


@dataclass(frozen=True)
class ReasoningPiece:
    reasoning: str = ""
    content: str = ""


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of marker."""
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:size]):
            return size
    return 0


class ReasoningStream:
    """Splits model text into reasoning and content; holds back a possible partial tag."""

    def __init__(self, parser: str):
        if parser not in REASONING_PARSERS:
            raise ValueError(f"unknown reasoning parser {parser!r} (use one of {', '.join(REASONING_PARSERS)})")
        self.text = ""
        self.done = 0
        self.state = "reasoning" if parser == "deepseek_r1" else "start"   # start | reasoning | after | content

    def feed(self, delta: str, final: bool = False) -> ReasoningPiece:
        self.text += delta
        reasoning, content = [], []
        while self.done < len(self.text):
            rest = self.text[self.done:]
            if self.state == "start":
                head = rest.lstrip()
                if head.startswith(OPEN):
                    self.done += len(rest) - len(head) + len(OPEN)
                    self.state = "reasoning"
                elif OPEN.startswith(head) and not final:
                    break                                   # "", "<", "<thi": wait
                else:
                    self.state = "content"
            elif self.state == "reasoning":
                end = rest.find(CLOSE)
                if end >= 0:
                    reasoning.append(rest[:end])
                    self.done += end + len(CLOSE)
                    self.state = "after"
                    continue
                keep = 0 if final else _partial_suffix(rest, CLOSE)
                reasoning.append(rest[:len(rest) - keep])
                self.done = len(self.text) - keep
                break
            elif self.state == "after":             # blank lines templates put after </think>
                self.done += len(rest) - len(rest.lstrip("\n"))
                self.state = "content" if rest.lstrip("\n") else "after"
            else:
                content.append(rest)
                self.done = len(self.text)
        return ReasoningPiece("".join(reasoning), "".join(content))

"""Request limits checked before any work: body bytes, prompts x n, text bytes, token ids.

The numbers come from the server's flags once (`FrontLimits.of(config)`); every check raises
a Refusal naming the limit and the flag that sets it, so a client sees what to change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import Kind, Problem, Refusal, invalid


@dataclass(frozen=True)
class FrontLimits:
    """What one request may carry into the server, before the engine's own RequestLimits."""

    max_body_bytes: int                # --max-message-bytes (gRPC messages, HTTP bodies)
    max_request_choices: int           # --max-request-choices: engine requests (prompts x n) per request
    max_total_tokens: int              # --max-total-tokens: ids per /detokenize, tokens per /tokenize

    @classmethod
    def of(cls, config: Any) -> "FrontLimits":
        return cls(max_body_bytes=config.max_message_bytes, max_request_choices=config.max_request_choices,
                   max_total_tokens=config.max_total_tokens)

    def check_body(self, num_bytes: int, over: bool = False) -> None:
        """TOO_LARGE when a body is (or is known to be, `over`) above --max-message-bytes."""
        if over or num_bytes > self.max_body_bytes:
            size = "over the limit" if over else f"{num_bytes} bytes; the limit is"
            raise Refusal(Kind.TOO_LARGE, f"the request body is {size} {self.max_body_bytes} bytes "
                                          "(--max-message-bytes)", (Problem("body", "too large"),))

    def check_choices(self, num_prompts: int, n: int) -> None:
        """INVALID when prompts x n engine requests exceed --max-request-choices (checked from the
        request's shape, before one engine request is built)."""
        total = num_prompts * n
        if total > self.max_request_choices:
            field = "n" if n > 1 else "prompt"
            raise invalid(field, f"{num_prompts} prompt(s) x n={n} asks for {total} completions; the limit "
                                 f"per request is {self.max_request_choices} (--max-request-choices)")

    def check_text(self, num_bytes: int, max_prompt_bytes: int, field: str) -> None:
        """INVALID when text cannot fit the longest prompt (the engine's bound, or the body limit)."""
        limit = max_prompt_bytes or self.max_body_bytes
        if num_bytes > limit:
            raise invalid(field, f"the text is {num_bytes} bytes, more than the {limit} bytes the longest "
                                 "accepted prompt can hold; shorten it")

    def check_token_ids(self, num_ids: int, field: str) -> None:
        if num_ids > self.max_total_tokens:
            raise invalid(field, f"{num_ids} token ids; the limit is {self.max_total_tokens} (--max-total-tokens)")

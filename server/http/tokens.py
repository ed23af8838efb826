"""The token texts of logprobs (/tokenize and /detokenize are front-door operations:
frontdoor/tokens.py)."""

from __future__ import annotations

from typing import Any, Callable


def token_text(engine: Any, as_ids: bool) -> Callable[[int], str]:
    """token id -> its text in logprobs ('token_id:N' with return_tokens_as_token_ids)."""
    if as_ids:
        return lambda token_id: f"token_id:{token_id}"
    return engine.token_text

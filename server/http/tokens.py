"""The token texts of logprobs (/tokenize and /detokenize are front-door operations:
frontdoor/tokens.py)."""

from __future__ import annotations

from typing import Any, Callable


async def token_text(engine: Any, as_ids: bool, adapter_id: str | None = None,
                     tenant: str | None = None) -> Callable[[int], str]:
    """token id -> its text in logprobs ('token_id:N' with return_tokens_as_token_ids), with the
    tokenizer of the request's adapter (its own for a resized vocabulary)."""
    if as_ids:
        return lambda token_id: f"token_id:{token_id}"
    if adapter_id is None:
        return engine.token_text
    return await engine.token_texts(adapter_id, tenant)

"""/tokenize, /detokenize and the token texts of logprobs, with the served model's tokenizer.

Encoding runs through the EngineClient's tokenizer commands, never on the step loop.
"""

from __future__ import annotations

from typing import Any, Callable

from .convert import chat_messages
from .errors import bad_request
from .schemas import DetokenizeRequest, TokenizeRequest


def token_text(engine: Any, as_ids: bool) -> Callable[[int], str]:
    """token id -> its text in logprobs ('token_id:N' with return_tokens_as_token_ids)."""
    if as_ids:
        return lambda token_id: f"token_id:{token_id}"
    return engine.token_text


async def tokenize(engine: Any, body: TokenizeRequest, max_model_len: int) -> dict:
    if (body.prompt is None) == (body.messages is None):
        raise bad_request("prompt", "give exactly one of prompt or messages")
    try:
        if body.messages is not None:
            tokens = await engine.render_chat(tuple(chat_messages(body.messages)))
        else:
            tokens = await engine.tokenize(body.prompt, add_special_tokens=body.add_special_tokens is not False)
    except ValueError as error:
        raise bad_request("messages" if body.messages is not None else "prompt", str(error)) from None
    return {"tokens": tokens, "count": len(tokens), "max_model_len": max_model_len}


async def detokenize(engine: Any, body: DetokenizeRequest) -> dict:
    vocab = engine.info.vocab_size
    bad = [t for t in body.tokens if not 0 <= t < vocab]
    if bad:
        raise bad_request("tokens", f"token ids must be in [0, {vocab}) (got {bad[0]})")
    return {"prompt": await engine.detokenize(list(body.tokens))}

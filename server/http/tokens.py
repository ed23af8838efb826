"""/tokenize, /detokenize and the token texts of logprobs, with the served model's tokenizer.

Encoding runs on the engine thread (between steps), the tokenizer's only writer.
"""

from __future__ import annotations

from typing import Any, Callable

from ..engine.prompt import encode_prompt, render_chat
from .convert import chat_messages
from .errors import bad_request
from .schemas import DetokenizeRequest, TokenizeRequest


def token_text(engine: Any, as_ids: bool) -> Callable[[int], str]:
    """token id -> its text in logprobs ('token_id:N' with return_tokens_as_token_ids)."""
    if as_ids:
        return lambda token_id: f"token_id:{token_id}"
    tokenizer = engine.engine.tokenizer
    return lambda token_id: tokenizer.decode([token_id])


async def tokenize(engine: Any, body: TokenizeRequest, max_model_len: int) -> dict:
    if (body.prompt is None) == (body.messages is None):
        raise bad_request("prompt", "give exactly one of prompt or messages")
    tokenizer = engine.engine.tokenizer
    if body.messages is not None:
        messages = chat_messages(body.messages)

        def encode() -> list[int]:
            return render_chat(tokenizer, messages)
    elif body.add_special_tokens is False:
        def encode() -> list[int]:
            return list(tokenizer(body.prompt, add_special_tokens=False)["input_ids"])
    else:
        def encode() -> list[int]:
            return encode_prompt(tokenizer, body.prompt)
    try:
        tokens = await engine.run_on_engine(encode)
    except ValueError as error:
        raise bad_request("messages" if body.messages is not None else "prompt", str(error)) from None
    return {"tokens": tokens, "count": len(tokens), "max_model_len": max_model_len}


async def detokenize(engine: Any, body: DetokenizeRequest) -> dict:
    vocab = engine.info.vocab_size
    bad = [t for t in body.tokens if not 0 <= t < vocab]
    if bad:
        raise bad_request("tokens", f"token ids must be in [0, {vocab}) (got {bad[0]})")
    tokenizer = engine.engine.tokenizer
    return {"prompt": await engine.run_on_engine(lambda: tokenizer.decode(body.tokens))}

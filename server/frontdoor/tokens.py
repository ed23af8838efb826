"""Tokenize / detokenize for any transport: bounded like a prompt, run off the engine thread.

The text of /tokenize is bounded by the same byte limit as a generation prompt (what the
longest accepted prompt can hold), the ids of /detokenize by --max-total-tokens, and both run
on the EngineClient's tokenizer thread, never on the engine's step loop.
"""

from __future__ import annotations

from typing import Sequence

from ..engine.io import RequestRejected
from ..engine.prompt import prompt_bytes
from .access import Operation, Principal, authorize
from .door import FrontDoor
from .errors import invalid


async def tokenize(door: FrontDoor, principal: Principal | None, text: str | None = None,
                   messages: Sequence[tuple[str, str]] | None = None, add_special_tokens: bool = True,
                   adapter_id: str | None = None) -> list[int]:
    """Token ids of `text`, or of `messages` rendered with the chat template (exactly one): the
    template of `adapter_id` where that adapter carries its own, else the base model's."""
    authorize(principal, Operation.TOKENIZE)
    if (text is None) == (messages is None):
        raise invalid("prompt", "give exactly one of prompt or messages")
    field = "messages" if messages is not None else "prompt"
    engine = door.engine()
    door.limits.check_text(prompt_bytes(text, messages), engine.info.max_prompt_bytes, field)
    tenant = principal.tenant if principal is not None else None
    try:
        if messages is not None:
            return await engine.render_chat(tuple(messages), adapter_id, tenant=tenant)
        return await engine.tokenize(text, add_special_tokens=add_special_tokens, adapter_id=adapter_id, tenant=tenant)
    except RequestRejected as error:
        raise invalid(field, error.message) from None
    except ValueError as error:
        raise invalid(field, str(error)) from None


async def detokenize(door: FrontDoor, principal: Principal | None, token_ids: Sequence[int],
                     adapter_id: str | None = None) -> str:
    """Text of `token_ids` with the tokenizer of `adapter_id`'s requests (an adapter with a resized
    vocabulary has its own; its ids are checked against its vocabulary), else the base model's."""
    authorize(principal, Operation.TOKENIZE)
    door.limits.check_token_ids(len(token_ids), "tokens")
    engine = door.engine()
    vocab = engine.info.vocab_size
    bad = next((t for t in token_ids if not 0 <= t < vocab), None)
    if bad is not None and adapter_id is None:
        raise invalid("tokens", f"token ids must be in [0, {vocab}) (got {bad})")
    try:
        return await engine.detokenize(list(token_ids), adapter_id=adapter_id,
                                       tenant=principal.tenant if principal is not None else None)
    except ValueError as error:
        raise invalid("tokens", str(error)) from None

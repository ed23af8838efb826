"""Request intake in the front end: validation and tokenization before a request crosses to the
engine-core process, on the front end's tokenizer thread (never the engine's step loop).

The engine core receives a request whose defaults are filled and its prompt's token ids; a
request the limits refuse never leaves the front end.
"""

from __future__ import annotations

from typing import Any, Callable

from ..config import EngineConfig
from ..io import GenerationRequest, RequestRejected
from ..prompt import encode_prompt, max_token_bytes, prompt_bytes, render_chat
from ..validation import check_prompt, validate_request


class Intake:
    """Validate and tokenize requests with the base model's tokenizer (one thread at a time)."""

    def __init__(self, config: EngineConfig, tokenizer: Any, vocab_size: int | None,
                 adapter_chat: Callable[[tuple[tuple[str, str], ...], str | None, str | None], list[int] | None]
                 | None = None):
        self.config = config
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.adapter_chat = adapter_chat      # a chat rendered with its adapter's own template (None: it has none)
        self.max_prompt_bytes = config.limits.max_input_tokens * max_token_bytes(tokenizer)

    def prepare(self, request: GenerationRequest) -> tuple[GenerationRequest, list[int]]:
        """(the request with defaults filled, its prompt's token ids); raises RequestRejected
        listing every problem."""
        limits = self.config.limits
        request = validate_request(request, limits)
        prompt_ids = self.prompt_ids(request)
        violations = check_prompt(request, prompt_ids, limits, self.config.scheduler.max_model_len,
                                  self.vocab_size)
        if violations:
            raise RequestRejected.of(violations)
        return request, prompt_ids

    def prompt_ids(self, request: GenerationRequest) -> list[int]:
        """prompt_token_ids as given, the chat rendered, or the text encoded; a prompt longer than
        max_prompt_bytes cannot fit max_input_tokens and is refused before tokenizing."""
        if request.prompt_token_ids is not None:
            return list(request.prompt_token_ids)
        num_bytes = prompt_bytes(request.prompt, request.messages)
        if num_bytes > self.max_prompt_bytes:
            max_tokens = self.config.limits.max_input_tokens
            raise RequestRejected("", f"the prompt is {num_bytes} bytes, more than {self.max_prompt_bytes} "
                                  f"({max_tokens} tokens of at most {self.max_prompt_bytes // max_tokens} "
                                  f"bytes); shorten it")
        if request.messages is not None:
            own = self.adapter_chat and self.adapter_chat(request.messages, request.adapter_id, request.tenant)
            if own is not None:
                return own
            try:
                return render_chat(self.tokenizer, request.messages)
            except ValueError as error:
                raise RequestRejected("messages", str(error)) from None
        return encode_prompt(self.tokenizer, request.prompt)

"""Request intake in the front end: validation and tokenization before a request crosses to the
engine-core process, on the front end's tokenizer thread (never the engine's step loop).

The engine core receives a request whose defaults are filled and its prompt's token ids; a
request the limits refuse never leaves the front end. Prompts and chats (chat options, an
adapter's own template) are turned into ids by prompt_ids.PromptIds, as in the in-process engine.
"""

from __future__ import annotations

from ..config import EngineConfig
from ..io import GenerationRequest, RequestRejected
from ..prompt_ids import PromptIds
from ..validation import check_prompt, validate_request


class Intake:
    """Validate and tokenize requests with the base model's tokenizer (one thread at a time)."""

    def __init__(self, config: EngineConfig, prompts: PromptIds, vocab_size: int | None):
        self.config = config
        self.prompts = prompts
        self.vocab_size = vocab_size

    def prepare(self, request: GenerationRequest) -> tuple[GenerationRequest, list[int]]:
        """(the request with defaults filled, its prompt's token ids); raises RequestRejected
        listing every problem."""
        limits = self.config.limits
        request = validate_request(request, limits)
        prompt_ids = self.prompts.of_request(request)
        own = self.prompts.for_request(request)      # an adapter's own (resized) vocabulary, or the base's
        violations = check_prompt(request, prompt_ids, limits, self.config.scheduler.max_model_len,
                                  self.vocab_size if own.is_base else own.vocab_size)
        if violations:
            raise RequestRejected.of(violations)
        return request, prompt_ids

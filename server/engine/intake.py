"""Request intake: a request is validated and tokenized once, before it reaches the engine.

Both EngineClients take requests through `Intake`, off the engine's step loop: the in-process
AsyncEngine (validate on the event loop, tokenize on its tokenizer thread) and the engine
process's front end (both on its tokenizer thread, before the request crosses to the core).
What comes out is a `ValidatedRequest` (defaults filled, prompt tokenized and checked), which
LLMEngine.add_request queues without checking it again. Prompts and chats (chat options, an
adapter's own template) are turned into ids by prompt_ids.PromptIds.
"""

from __future__ import annotations

from .config import EngineConfig
from .io import GenerationRequest, RequestRejected, ValidatedRequest
from .prompt_ids import PromptIds
from .validation import check_prompt, validate_request


class Intake:
    """Validate and tokenize requests with one PromptIds (one thread at a time)."""

    def __init__(self, config: EngineConfig, prompts: PromptIds, vocab_size: int | None):
        self.config = config
        self.prompts = prompts
        self.vocab_size = vocab_size

    def prepare(self, request: GenerationRequest) -> ValidatedRequest:
        """validate, then tokenize; raises RequestRejected listing every problem."""
        return self.tokenize(self.validate(request))

    def validate(self, request: GenerationRequest) -> GenerationRequest:
        """The request with defaults filled (every problem visible without tokenizing; cheap)."""
        return validate_request(request, self.config.limits)

    def tokenize(self, request: GenerationRequest) -> ValidatedRequest:
        """A request `validate` returned, with its prompt's token ids, checked against the length
        limits and the vocabulary (an adapter's own, resized one where it has one). A prompt of more than max_prompt_bytes is refused before
        tokenizing."""
        limits = self.config.limits
        prompt_ids = self.prompts.of_request(request)
        own = self.prompts.for_request(request)      # an adapter's own (resized) vocabulary, or the base's
        violations = check_prompt(request, prompt_ids, limits, self.config.scheduler.max_model_len,
                                  self.vocab_size if own.is_base else own.vocab_size)
        if violations:
            raise RequestRejected.of(violations)
        return ValidatedRequest(request, prompt_ids, own.adapter_key)

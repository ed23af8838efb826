"""A request's prompt token ids: the one intake path of both EngineClients.

Intake (intake.py) calls `PromptIds` for both: the in-process engine (on AsyncEngine's tokenizer
thread) and the engine process's front end, so that a chat renders the
same way in both modes: the base model's template for plain messages; the adapter's own
template, a request's template or ChatOptions (tools, tool calls in the history, template
kwargs, documents, continue_final_message) through chat_template.ChatRenderer's sandbox.
An adapter with a resized vocabulary has its own tokenizer (adapter_tokenizers.py): its prompts
are encoded with it, and its chats rendered in the sandbox (its own template, else its
tokenizer's) and encoded with it.
"""

from __future__ import annotations

from typing import Any, Callable

from .adapter_tokenizers import AdapterTokenizers, RequestTokenizer
from .chat_options import ChatOptions
from .chat_template import ChatRenderer, TemplateError
from .io import GenerationRequest, RequestRejected
from .long_prompt import PREFIX_MARGIN, START_CHARS_PER_TOKEN, tokens_at_least
from .prompt import encode_prompt, max_token_bytes, prompt_bytes, render_chat, render_chat_text
from .validation import input_field

# (adapter_id, tenant) -> the chat template that adapter version carries (None: the base's)
AdapterTemplate = Callable[[str | None, str | None], str | None]


OWN_VOCAB_CONSTRAINT = ("structured output is not supported on an adapter with its own (resized) vocabulary: the "
                        "grammar's token masks are built for the base model's tokenizer")


def _no_adapter_template(_adapter_id: str | None, _tenant: str | None) -> str | None:
    return None


class PromptIds:
    """Token ids of prompts and chats with one tokenizer (call from one thread at a time)."""

    def __init__(self, tokenizer: Any, chat: ChatRenderer, max_input_tokens: int,
                 adapter_template: AdapterTemplate = _no_adapter_template,
                 tokenizers: AdapterTokenizers | None = None):
        self.tokenizer = tokenizer
        self.chat = chat
        self.max_input_tokens = max_input_tokens
        self.adapter_template = adapter_template
        self.tokenizers = tokenizers or AdapterTokenizers(tokenizer, None)
        self.max_prompt_bytes = max_input_tokens * max_token_bytes(tokenizer)
        # prompts (chats' contents) of more bytes than this are first counted on prefixes
        self.long_prompt_bytes = 2 * (max_input_tokens + PREFIX_MARGIN) * START_CHARS_PER_TOKEN

    def of_request(self, request: GenerationRequest) -> list[int]:
        """prompt_token_ids as given, the chat rendered, or the text encoded. A prompt of more
        than max_prompt_bytes cannot fit max_input_tokens and is refused before tokenizing; a
        long one whose prefix already has more tokens is refused after tokenizing that prefix
        (long_prompt.py)."""
        if request.sampling.constraint is not None and not self.for_request(request).is_base:
            raise RequestRejected("sampling.constraint", OWN_VOCAB_CONSTRAINT)
        if request.prompt_token_ids is not None:
            return list(request.prompt_token_ids)
        num_bytes = prompt_bytes(request.prompt, request.messages) + (request.chat.num_bytes if request.chat else 0)
        if num_bytes > self.max_prompt_bytes:
            raise RequestRejected(input_field(request), f"the prompt is {num_bytes} bytes, more than {self.max_prompt_bytes} "
                                  f"({self.max_input_tokens} tokens of at most "
                                  f"{self.max_prompt_bytes // self.max_input_tokens} bytes); shorten it")
        if request.messages is not None:
            return self.of_chat(request.messages, request.adapter_id, request.chat, request.tenant,
                                long=num_bytes > self.long_prompt_bytes)
        tokenizer = self.for_request(request).tokenizer
        if num_bytes > self.long_prompt_bytes:
            self.refuse_if_longer("prompt", request.prompt, special=True, tokenizer=tokenizer)
        return encode_prompt(tokenizer, request.prompt)

    def for_request(self, request: GenerationRequest) -> RequestTokenizer:
        """The tokenizer of `request` (its adapter's own, or the base's) and its vocabulary size."""
        return self.tokenizers.for_request(request.adapter_id, request.tenant)

    def refuse_if_longer(self, field: str, text: str, special: bool, tokenizer: Any = None) -> None:
        """RequestRejected naming `field` when a prefix of `text` (encoded with `tokenizer`, the
        base's by default, with its special tokens when `special`, as a plain prompt is; without,
        as a rendered chat is) already has more than max_input_tokens tokens
        (long_prompt.tokens_at_least)."""
        tokenizer = tokenizer or self.tokenizer

        def count(part: str) -> int:
            return len(tokenizer(part, add_special_tokens=special)["input_ids"])

        at_least = tokens_at_least(count, text, self.max_input_tokens)
        if at_least is not None:
            what = "the prompt" if field == "prompt" else "the rendered chat"
            raise RequestRejected(field, f"{what} has at least {at_least} tokens (counted on a prefix); "
                                         f"the limit is {self.max_input_tokens}")

    def of_chat(self, messages: tuple[tuple[str, str], ...], adapter_id: str | None = None,
                options: ChatOptions | None = None, tenant: str | None = None, long: bool = False) -> list[int]:
        """A chat rendered with the adapter's own template when it carries one, else the base
        model's; with options (or another template) through ChatRenderer. RequestRejected
        naming `messages` (or `chat_template` for a request's own template) when it cannot.
        long: the contents are long; the rendered chat is first counted on prefixes."""
        template = self.adapter_template(adapter_id, tenant)
        own = self.tokenizers.for_request(adapter_id, tenant)
        if not own.is_base:
            return self._with_own_tokenizer(tuple(messages), options or ChatOptions(), template, own.tokenizer, long)
        if options is None and template is None:
            try:
                if long:
                    self.refuse_if_longer("messages", render_chat_text(self.tokenizer, list(messages)), special=False)
                return render_chat(self.tokenizer, list(messages))
            except ValueError as error:
                raise RequestRejected("messages", str(error)) from None
        return self.with_options(tuple(messages), options or ChatOptions(), template, long)

    def with_options(self, messages: tuple[tuple[str, str], ...], options: ChatOptions,
                     template: str | None = None, long: bool = False) -> list[int]:
        """A chat with template options (chat_template.py); template: an adapter's own."""
        check = (lambda text: self.refuse_if_longer("messages", text, special=False)) if long else None
        try:
            return self.chat.ids(messages, options, template, check)
        except TemplateError as error:
            raise RequestRejected("chat_template" if options.chat_template else "messages", str(error)) from None

    def _with_own_tokenizer(self, messages: tuple[tuple[str, str], ...], options: ChatOptions,
                            template: str | None, tokenizer: Any, long: bool = False) -> list[int]:
        """A resized-vocabulary adapter's chat: rendered in the sandbox with its own template (else
        its tokenizer's), encoded with its tokenizer."""
        own_template = getattr(tokenizer, "chat_template", None)
        template = template or (own_template if isinstance(own_template, str) else None)
        if template is None and not options.chat_template:
            raise RequestRejected("messages", "this adapter's tokenizer has no chat template; send a plain "
                                  "prompt instead")
        try:
            text = self.chat.render_text(messages, options, template)
        except TemplateError as error:
            raise RequestRejected("chat_template" if options.chat_template else "messages", str(error)) from None
        if long:
            self.refuse_if_longer("messages", text, special=False, tokenizer=tokenizer)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

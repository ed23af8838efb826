"""Incremental detokenization: token ids in, new text out, one small window decode per call.

Two offsets over the token list (as in vLLM / TGI): `prefix_offset` starts a short window of
already-emitted tokens decoded for context (leading-space rules of SentencePiece and byte-level
BPE depend on the previous token), `read_offset` marks where unemitted tokens begin. New text
is `decode(tokens[prefix:]) - decode(tokens[prefix:read])`; when it ends with U+FFFD the last
character is still incomplete (its bytes span several tokens): the text up to the latest
token boundary that ends on a whole character is emitted and the rest waits for the tokens
that complete it (for output that is not valid UTF-8 at all, at most MAX_PENDING_TOKENS
tokens wait, which bounds the window).
"""

from __future__ import annotations

from typing import Any, Callable

_REPLACEMENT = "\ufffd"
PROMPT_CONTEXT_TOKENS = 5     # prompt tokens kept as decoding context for the first output
_MAX_CHAR_TOKENS = 4          # a UTF-8 character has at most 4 bytes, so spans at most 4 tokens
MAX_PENDING_TOKENS = 16       # past this, a trailing U+FFFD is malformed output, not a split char


class IncrementalDetokenizer:
    """Turns a stream of generated token ids into text deltas for one request.

    The concatenation of all deltas equals `tokenizer.decode(output_ids, skip_special_tokens)`
    for well-formed output (for tokenizers that drop the first token's leading space at the
    start of a decode, the delta keeps it, as the text continues the prompt). A character
    whose bytes are still incomplete is held back until it is complete; `flush()` releases
    such a tail (as U+FFFD) when the request ends.
    """

    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._decode_ids = decode_function(tokenizer, skip_special_tokens)
        context = list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:])
        if self._decode(context).endswith(_REPLACEMENT):
            context = []      # the prompt ends mid-character: its tail would misalign deltas
        self.token_ids: list[int] = context
        self.prefix_offset = 0
        self.read_offset = len(context)

    def _decode(self, token_ids: list[int]) -> str:
        return self._decode_ids(token_ids) if token_ids else ""

    def add(self, token_ids: list[int]) -> str:
        """Append newly generated ids; return the text they complete (maybe "")."""
        self.token_ids.extend(token_ids)
        prefix_text = self._decode(self.token_ids[self.prefix_offset:self.read_offset])
        num_tokens = len(self.token_ids)
        full_text = self._decode(self.token_ids[self.prefix_offset:])
        if len(full_text) <= len(prefix_text):
            return ""
        if not full_text.endswith(_REPLACEMENT):
            return self._advance(num_tokens, full_text[len(prefix_text):])
        # The last character is incomplete: emit up to the latest cut that ends cleanly.
        for cut in range(num_tokens - 1, max(self.read_offset, num_tokens - _MAX_CHAR_TOKENS), -1):
            text = self._decode(self.token_ids[self.prefix_offset:cut])
            if len(text) > len(prefix_text) and not text.endswith(_REPLACEMENT):
                return self._advance(cut, text[len(prefix_text):])
        if num_tokens - self.read_offset > MAX_PENDING_TOKENS:
            return self._advance(num_tokens, full_text[len(prefix_text):])
        return ""

    def _advance(self, read_offset: int, delta: str) -> str:
        self.prefix_offset, self.read_offset = self.read_offset, read_offset
        return delta

    def flush(self) -> str:
        """Text of tokens still held back (an incomplete final character decodes as U+FFFD)."""
        prefix_text = self._decode(self.token_ids[self.prefix_offset:self.read_offset])
        full_text = self._decode(self.token_ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.token_ids)
        return full_text[len(prefix_text):]


def decode_function(tokenizer: Any, skip_special_tokens: bool) -> Callable[[list[int]], str]:
    """ids -> text, as tokenizer.decode(ids, skip_special_tokens=...).

    A fast tokenizer whose decode adds no clean-up step decodes through its Rust backend
    directly: the same text (transformers calls the same backend), a third of the time, and
    the detokenizer decodes twice per generated token of every request.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and getattr(tokenizer, "clean_up_tokenization_spaces", True) is False:
        return lambda ids: backend.decode(ids, skip_special_tokens=skip_special_tokens)
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

"""Refuse an over-long prompt after tokenizing only a prefix of it.

Tokenizing a 3.9 MB prompt takes seconds of a core (issue 36: on 2 cores it slows every stream's
decode); when a prefix of the text already has more tokens than `max_input_tokens`, so has the
text, and the rest need not be tokenized.

Why a prefix's count bounds the whole text's (`safe_cut`): the text is cut only just before a
space that follows a letter or digit. No pre-tokenizer of the byte-level BPE family (GPT-2,
Llama 3, Qwen2, SmolLM: `\\p{L}+`, `\\p{N}{1,3}`, `[^\\s\\p{L}\\p{N}]+[\\r\\n]*`, `\\s+(?!\\S)`, ...)
has a piece that runs from a letter or digit into a following space, so the pieces left of the
cut are the same in the prefix and in the whole text, and BPE encodes each piece on its own.
SentencePiece-style tokenizers (Llama 2, Mistral: spaces become `▁`, a piece starts with `▁` and
never holds one after another character) cannot merge across the cut either. Added tokens
(`<|im_start|>`) split the same on both sides, and the special tokens a post-processor adds (BOS,
EOS) are added to both. So the prefix's tokens are a prefix of the text's tokens (plus the same
specials) and count(prefix) <= count(text): tests/unit/test_long_prompt.py checks this on
adversarial texts (long words, runs of spaces and newlines, digits, CJK, emoji, byte fallback) for
the default model's tokenizer, a SentencePiece-style Llama tokenizer and a byte-level BPE with
Llama 3's split pattern. PREFIX_MARGIN tokens are
subtracted anyway, for a tokenizer this argument does not cover (a Replace normalizer or merges
that join a word with the space after it would change at most the cut's last word); a prompt
with fewer than max_input_tokens tokens is never refused, whatever the margin.

A text without such a space in the second half of a prefix (one long word, CJK without spaces)
is tokenized whole, as before; the byte bound (prompt_ids.py) still applies to it.
"""

from __future__ import annotations

import re
from collections.abc import Callable

PREFIX_MARGIN = 16          # tokens subtracted from a prefix's count (see the module docstring)
START_CHARS_PER_TOKEN = 6   # the first prefix: (limit + margin) x this many characters

_CUT = re.compile(r"(?<=[^\W_]) ")       # a space right after a letter or digit


def safe_cut(text: str, end: int) -> int | None:
    """The largest index i in (end // 2, end] where text[i] is a space after a letter or digit
    (text[:i] then tokenizes to a prefix of text's tokens), or None when there is none."""
    end = min(end, len(text) - 1)
    low = end // 2
    window = 256
    while True:
        start = max(low, end - window)
        last = None
        for match in _CUT.finditer(text, start, end + 1):
            last = match.start()
        if last is not None and last > low:
            return last
        if start == low:
            return None
        window *= 8


def tokens_at_least(count: Callable[[str], int], text: str, limit: int, margin: int = PREFIX_MARGIN,
                    chars_per_token: int = START_CHARS_PER_TOKEN) -> int | None:
    """A lower bound above `limit` on the tokens of `text`, from prefixes of it, else None.

    count: the number of token ids the caller's encoding gives a text (the same encoding, special
    tokens included, that the whole prompt would get). Prefixes of (limit + margin) x
    chars_per_token characters, doubling, each at most half the text (a prefix longer than
    that saves too little), cut by `safe_cut`; the first whose count exceeds limit + margin
    returns count - margin. None: no prefix shows it (tokenize the whole text and check it).
    """
    size = (limit + margin) * chars_per_token
    while 2 * size <= len(text):
        cut = safe_cut(text, size)
        if cut is not None:
            num = count(text[:cut])
            if num - margin > limit:
                return num - margin
        size *= 2
    return None

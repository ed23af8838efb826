"""The tokenizer of each request: the base model's, or the adapter version's own.

An adapter with a resized vocabulary (embed_tokens / lm_head tables of V' > V rows, trained
with added tokens) carries its tokenizer files (adapters_store/adapter_tokenizer.py). Its
requests are tokenized, checked (token ids < V'), detokenized and matched against stop strings
with that tokenizer; every other request uses the base's. `AdapterTokenizers.for_request` is the
one place that choice is made: the prompt intake (prompt_ids.py, both engine modes) and the
detokenizers call it. Loaded tokenizers are kept in a small LRU keyed by adapter version
(`name@N`): a version's files never change.

Loading writes the JSON files to a private temporary directory and opens it with transformers'
AutoTokenizer (trust_remote_code=False, local files only): no code is ever imported (the store
refused `auto_map` at upload).
"""

from __future__ import annotations

import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...adapters_store.errors import StoreError

DEFAULT_MAX_CACHED = 8


@dataclass(frozen=True)
class RequestTokenizer:
    """The tokenizer a request uses and the vocabulary its token ids live in."""

    tokenizer: Any
    vocab_size: int | None          # ids must be < this (None: unchecked)
    adapter_key: str | None = None  # the adapter version whose own tokenizer this is (None: the base's)

    @property
    def is_base(self) -> bool:
        return self.adapter_key is None


class AdapterTokenizers:
    """for_request(adapter_id, tenant) -> RequestTokenizer (thread-safe)."""

    def __init__(self, base: Any, base_vocab_size: int | None, store: Any = None,
                 max_cached: int = DEFAULT_MAX_CACHED):
        self.base = RequestTokenizer(base, base_vocab_size)
        self.store = store
        self.max_cached = max_cached
        self._cache: OrderedDict[str, RequestTokenizer] = OrderedDict()
        self._lock = threading.Lock()

    def for_request(self, adapter_id: str | None, tenant: str | None) -> RequestTokenizer:
        """The base's tokenizer, unless the adapter (resolved as the request will be) resizes the
        vocabulary. An adapter that does not resolve gets the base's: resolving it for the
        request reports the error."""
        if not adapter_id or self.store is None:
            return self.base
        try:
            record = self.store.resolve(adapter_id, tenant)
        except StoreError:
            return self.base
        if not getattr(record, "resized_vocab", False):
            return self.base
        return self.for_key(record.key, record.vocab_size)

    def for_key(self, key: str, vocab_size: int) -> RequestTokenizer:
        """Adapter version `key`'s own tokenizer (loaded from the store on a miss)."""
        with self._lock:
            found = self._cache.get(key)
            if found is not None:
                self._cache.move_to_end(key)
                return found
        loaded = RequestTokenizer(load_adapter_tokenizer(self.store.tokenizer_files(key)), vocab_size, key)
        with self._lock:
            self._cache[key] = loaded
            self._cache.move_to_end(key)
            while len(self._cache) > self.max_cached:
                self._cache.popitem(last=False)
        return loaded


def load_adapter_tokenizer(files: dict[str, str]) -> Any:
    """A transformers tokenizer from an adapter's tokenizer files (JSON only, no remote code)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    with tempfile.TemporaryDirectory(prefix="loraplex-tokenizer-") as directory:
        for name, text in files.items():
            (Path(directory) / name).write_text(text, encoding="utf-8")
        try:
            return AutoTokenizer.from_pretrained(directory, trust_remote_code=False, local_files_only=True,
                                                 use_fast=True)
        except (OSError, ValueError, ImportError, AttributeError):
            # a tokenizer_class this transformers lacks: tokenizer.json alone still defines it
            return PreTrainedTokenizerFast(tokenizer_file=str(Path(directory) / "tokenizer.json"))


def base_tokens(tokenizer: Any) -> tuple[str, ...]:
    """The base tokenizer's tokens by id (what an adapter's own tokenizer must start with)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = backend.get_vocab(with_added_tokens=True) if backend is not None else tokenizer.get_vocab()
    tokens = [""] * (max(vocab.values(), default=-1) + 1)
    for token, index in vocab.items():
        tokens[index] = token
    return tuple(tokens)


def encode_text(own: RequestTokenizer, text: str, add_special_tokens: bool = True) -> list[int]:
    """Token ids of `text` with the request's tokenizer (special tokens as a prompt gets them)."""
    return list(own.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def decode_ids(own: RequestTokenizer, token_ids: list[int]) -> str:
    """Text of `token_ids` with the request's tokenizer; ValueError when an id is outside its vocabulary."""
    if own.vocab_size is not None:
        bad = next((t for t in token_ids if not 0 <= t < own.vocab_size), None)
        if bad is not None:
            raise ValueError(f"token ids must be in [0, {own.vocab_size}) (got {bad})")
    return own.tokenizer.decode(list(token_ids))


def token_texts(own: RequestTokenizer):
    """token id -> its text with the request's tokenizer (logprobs' `token` fields)."""
    tokenizer = own.tokenizer
    return lambda token_id: tokenizer.decode([token_id])

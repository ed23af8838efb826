"""An adapter's own tokenizer files: needed by, and only allowed with, a resized vocabulary.

An adapter trained with added tokens has embed_tokens / lm_head tables of V' > V rows (V: the
served base's vocabulary). Its requests are tokenized and detokenized with the tokenizer it was
trained with, uploaded beside the weights as JSON only:

    tokenizer.json            (required) the `tokenizers` library's serialized tokenizer
    tokenizer_config.json     (optional) transformers' settings (special tokens, chat template)
    special_tokens_map.json   (optional)

Never code: a tokenizer_config.json with `auto_map` (custom tokenizer classes) is refused, and
nothing is loaded with trust_remote_code. The files are checked at upload by loading
tokenizer.json with `tokenizers` (Rust, no code): every id it can produce must have a row
(tokenizer size T <= V', so tables padded to a multiple, as `resize_token_embeddings(...,
pad_to_multiple_of=...)` writes them, are accepted), it must add tokens beyond the base
tokenizer's, and its first ids must name the same tokens as the base tokenizer's (else the
base rows of the tables would mean other tokens). They are stored as one JSON bundle blob
({file name: text}) per adapter version.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import AdapterValidationError

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
TOKENIZER_FILES = (TOKENIZER_JSON, TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP)
# keys of tokenizer_config.json that would make transformers import code
_CODE_KEYS = ("auto_map",)


@dataclass(frozen=True)
class TokenizerBundle:
    """An adapter's tokenizer files (name -> UTF-8 text), checked; `sha256` is of `blob()`."""

    files: Mapping[str, str]
    vocab_size: int                  # tokens the tokenizer knows (added tokens included)

    def blob(self) -> bytes:
        """The stored form: one JSON object {file name: text}, keys sorted."""
        return json.dumps(dict(self.files), sort_keys=True, ensure_ascii=False).encode("utf-8")

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.blob()).hexdigest()


def bundle_files(blob: bytes) -> dict[str, str]:
    """The files of a stored bundle (the inverse of TokenizerBundle.blob)."""
    files = json.loads(blob.decode("utf-8"))
    if not isinstance(files, dict) or TOKENIZER_JSON not in files:
        raise ValueError("the stored tokenizer bundle is not a JSON object holding tokenizer.json")
    return {str(name): str(text) for name, text in files.items() if name in TOKENIZER_FILES}


def check_tokenizer_files(raw: Mapping[str, bytes], table_vocab: int, base_vocab: int,
                          base_tokens: Sequence[str] | None, max_bytes: int) -> TokenizerBundle:
    """Check an adapter's tokenizer files against its tables' vocabulary (V' = table_vocab) and the
    base's (V = base_vocab; base_tokens: the base tokenizer's tokens by id). Raises
    AdapterValidationError (rule `tokenizer`) naming the file and what is wrong."""
    unknown = sorted(set(raw) - set(TOKENIZER_FILES))
    if unknown:
        raise _error(f"{unknown[0]}: an adapter's tokenizer is JSON files only ({', '.join(TOKENIZER_FILES)}); "
                     f"code or other files are never loaded")
    if TOKENIZER_JSON not in raw:
        raise _error(f"{TOKENIZER_JSON} is missing: an adapter with a resized vocabulary ({table_vocab} tokens, "
                     f"the base has {base_vocab}) must upload the tokenizer it was trained with "
                     f"({', '.join(TOKENIZER_FILES)})")
    texts = {name: _text(name, data, max_bytes) for name, data in raw.items()}
    for name in (TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP):
        if name in texts:
            _check_json_object(name, texts[name])
    tokens = _tokenizer_tokens(texts[TOKENIZER_JSON])
    if len(tokens) > table_vocab:
        raise _error(f"{TOKENIZER_JSON} has {len(tokens)} tokens but the adapter's embed_tokens / lm_head tables "
                     f"have {table_vocab} rows: ids {table_vocab}..{len(tokens) - 1} would have no embedding; "
                     f"upload the tokenizer the adapter was trained with")
    if base_tokens is None:
        raise _error("this server does not know its base model's tokenizer, so it cannot check an adapter's "
                     "own tokenizer; adapters with a resized vocabulary are refused")
    _check_base_prefix(tokens, base_tokens, base_vocab)
    return TokenizerBundle({name: texts[name] for name in TOKENIZER_FILES if name in texts}, len(tokens))


def _text(name: str, data: bytes, max_bytes: int) -> str:
    if len(data) > max_bytes:
        raise _error(f"{name} is {len(data)} bytes, above the limit of {max_bytes} "
                     f"(StoreConfig.max_tokenizer_bytes)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise _error(f"{name} is not UTF-8 text") from None


def _check_json_object(name: str, text: str) -> None:
    try:   # not loads_strict: transformers writes model_max_length as a 31-digit integer
        value = json.loads(text)
    except (ValueError, RecursionError) as error:
        raise _error(f"{name} is not valid JSON: {error}") from None
    if not isinstance(value, dict):
        raise _error(f"{name} must hold a JSON object")
    for key in _CODE_KEYS:
        if key in value:
            raise _error(f"{name} has {key!r}: it names custom tokenizer code, which this server never loads "
                         f"(no trust_remote_code); upload a tokenizer that the tokenizers library reads alone")


def _tokenizer_tokens(text: str) -> list[str]:
    """Token by id of a serialized `tokenizers` tokenizer ("" for an id it leaves unused)."""
    from tokenizers import Tokenizer

    try:
        tokenizer = Tokenizer.from_str(text)
    except Exception as error:  # noqa: BLE001 - the Rust parser raises its own exception type
        raise _error(f"{TOKENIZER_JSON} is not a tokenizer the tokenizers library can load: {error}") from None
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    size = max(vocab.values(), default=-1) + 1
    tokens = [""] * size
    for token, index in vocab.items():
        tokens[index] = token
    return tokens


def _check_base_prefix(tokens: list[str], base_tokens: Sequence[str], base_vocab: int) -> None:
    """Ids below min(V, base tokenizer size) must name the base's tokens; some token must be added."""
    shared = min(base_vocab, len(base_tokens))
    if len(tokens) <= len(base_tokens):
        raise _error(f"{TOKENIZER_JSON} has {len(tokens)} tokens and adds none to the base tokenizer's "
                     f"{len(base_tokens)}; an adapter with a resized vocabulary needs the tokenizer it was "
                     f"trained with (the one holding its added tokens)")
    for index in range(shared):
        if tokens[index] != base_tokens[index]:
            raise _error(f"{TOKENIZER_JSON}: id {index} is {tokens[index]!r} but the base tokenizer's is "
                         f"{base_tokens[index]!r}; the adapter's first {shared} ids must be the base's (its "
                         f"tables' base rows mean those tokens). It was trained on another base")


def _error(message: str) -> AdapterValidationError:
    return AdapterValidationError("tokenizer", message)


def staged_tokenizer(read: Callable[[str], bytes | None], table_vocab: int, base_vocab: int,
                     base_tokens: Sequence[str] | None, max_bytes: int) -> TokenizerBundle | None:
    """The checked tokenizer bundle of a staged adapter whose tables have `table_vocab` rows (0: the
    base's vocabulary: its tokenizer files, if any, are not stored; the base's tokenizer serves it).
    read(file name) -> the staged file's bytes, or None when it was not sent."""
    if not table_vocab:
        return None
    raw = {name: data for name in TOKENIZER_FILES if (data := read(name)) is not None}
    return check_tokenizer_files(raw, table_vocab, base_vocab, base_tokens, max_bytes)


def tokenizer_sources(directory: Path, allowed_roots: tuple[str, ...]) -> list[tuple[str, Path]]:
    """(name, real path) of the tokenizer files in a registered adapter directory (confined to the roots)."""
    from .adapter_template import confined_file

    return [(name, real) for name in TOKENIZER_FILES
            if (real := confined_file(directory, name, allowed_roots)) is not None]

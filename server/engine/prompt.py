"""Tokenizer loading, prompt encoding, chat rendering and end-of-sequence ids."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

def load_tokenizer(model_dir: str | Path) -> Any:
    """The model directory's HF tokenizer (local files only, never remote code)."""
    from transformers import AutoTokenizer

    path = Path(model_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {str(path)!r} does not exist")
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False, local_files_only=True)
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot load a tokenizer from {str(path)!r}: it needs tokenizer.json or "
                         f"tokenizer_config.json with a supported tokenizer ({error})") from error


def max_token_bytes(tokenizer: Any, default: int = 256) -> int:
    """An upper bound on the UTF-8 bytes of text one token covers (the longest vocab entry).

    Byte-level BPE writes each byte as one character (>= 1 UTF-8 byte) and SentencePiece
    pieces are the text itself, so a prompt of more than max_input_tokens * this many bytes
    cannot fit in max_input_tokens tokens: it is refused without tokenizing it.
    """
    try:
        vocab = tokenizer.get_vocab()
    except Exception:  # noqa: BLE001 - a tokenizer without a vocab: fall back to a generous bound
        return default
    return max((len(token.encode("utf-8", "surrogatepass")) for token in vocab), default=default)


def prompt_bytes(prompt: str | None, messages: Sequence[tuple[str, str]] | None) -> int:
    """UTF-8 bytes of a plain prompt, or of every chat message's content (roles are tiny)."""
    if prompt is not None:
        return len(prompt.encode("utf-8", "surrogatepass")) if isinstance(prompt, str) else 0
    return sum(len(message[1].encode("utf-8", "surrogatepass")) for message in messages or ()
               if isinstance(message, (tuple, list)) and len(message) == 2 and isinstance(message[1], str))


def encode_prompt(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a plain prompt, as transformers gives them (special tokens included)."""
    return list(tokenizer(text)["input_ids"])


def render_chat(tokenizer: Any, messages: Sequence[tuple[str, str]]) -> list[int]:
    """Token ids of a chat rendered with the tokenizer's template plus the assistant prompt.

    messages: (role, content) pairs, already checked (validation.py)."""
    rendered = tokenizer.apply_chat_template(_chat(tokenizer, messages), add_generation_prompt=True, tokenize=True)
    if isinstance(rendered, Mapping) or hasattr(rendered, "input_ids"):
        rendered = rendered["input_ids"]              # transformers 5 returns a BatchEncoding
    return [int(t) for t in rendered]


def render_chat_text(tokenizer: Any, messages: Sequence[tuple[str, str]]) -> str:
    """The text render_chat tokenizes (without special tokens added): the template's output."""
    return tokenizer.apply_chat_template(_chat(tokenizer, messages), add_generation_prompt=True, tokenize=False)


def _chat(tokenizer: Any, messages: Sequence[tuple[str, str]]) -> list[dict]:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("this model's tokenizer has no chat template; send a plain prompt instead")
    return [{"role": role, "content": content} for role, content in messages]


def _as_ids(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def eos_token_ids(model_dir: str | Path, tokenizer: Any) -> tuple[int, ...]:
    """The tokenizer's eos id merged with generation_config.json's eos_token_id (int or list)."""
    ids = _as_ids(getattr(tokenizer, "eos_token_id", None))
    config_path = Path(model_dir) / "generation_config.json"
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{config_path} is not valid JSON: {error}") from error
        ids += _as_ids(config.get("eos_token_id"))
    return tuple(dict.fromkeys(ids))

"""An adapter's own chat template: found in its directory, size-limited and checked before it is stored.

A PEFT directory may carry `chat_template.jinja`, or a `tokenizer_config.json` whose
`chat_template` is a string (or a list of named templates with a "default" one). The text is
kept with the adapter version (registry column `chat_template`); the engine renders that
adapter's chat requests with it, in its sandbox. The store cannot render Jinja itself: the
engine hands it a check (`AdapterStore.set_template_check`) that renders a test conversation
within the engine's limits and raises ValueError when the template fails, loops or is too big.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

from .errors import AdapterValidationError, PermissionDenied

TEMPLATE_NAME = "chat_template.jinja"
TOKENIZER_CONFIG_NAME = "tokenizer_config.json"
TemplateCheck = Callable[[str], None]


def template_source(directory: Path, allowed_roots: tuple[str, ...]) -> tuple[str, Path] | None:
    """(name, real path) of the file in `directory` that carries a chat template (confined to the roots)."""
    for name in (TEMPLATE_NAME, TOKENIZER_CONFIG_NAME):
        real = confined_file(directory, name, allowed_roots)
        if real is not None:
            return name, real
    return None


def confined_file(directory: Path, name: str, allowed_roots: tuple[str, ...]) -> Path | None:
    """The real path of `directory / name` when it exists (None otherwise); PermissionDenied when it
    is a symlink out of the allowed register roots."""
    path = directory / name
    if not path.exists():
        return None
    real = Path(os.path.realpath(path))
    roots = [Path(os.path.realpath(root)) for root in allowed_roots]
    if not any(real == root or root in real.parents for root in roots):
        raise PermissionDenied(f"{name} is a symlink to a file outside the allowed register roots; "
                               f"copy the file into the adapter directory instead")
    return real


def template_text(file_name: str, data: bytes) -> str | None:
    """The template carried by `data` (the bytes of chat_template.jinja or tokenizer_config.json)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise AdapterValidationError("chat_template", f"{file_name} is not UTF-8 text") from None
    if file_name == TEMPLATE_NAME:
        return text
    try:
        value = json.loads(text).get("chat_template") if text.strip().startswith("{") else None
    except ValueError as error:
        raise AdapterValidationError("chat_template", f"{file_name} is not valid JSON: {error}") from None
    if isinstance(value, list):          # transformers' named templates: [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        value = named.get("default")
    if value is not None and not isinstance(value, str):
        raise AdapterValidationError("chat_template", f"{file_name}: chat_template must be a string")
    return value or None


def check_template(text: str, file_name: str, max_bytes: int, check: TemplateCheck | None) -> None:
    """Refuse a template above max_bytes, or one the engine's check cannot render (message names the file)."""
    size = len(text.encode("utf-8"))
    if size > max_bytes:
        raise AdapterValidationError("chat_template", f"{file_name}: the chat template is {size} bytes, above "
                                     f"the limit of {max_bytes}")
    if check is None:
        return
    try:
        check(text)
    except ValueError as error:
        raise AdapterValidationError("chat_template", f"{file_name}: the chat template does not render a test "
                                     f"conversation: {error}") from None

"""Strict JSON for untrusted adapter files: every malformed input is a ValueError subclass.

Python's `json` accepts things the Rust safetensors loader (and a careful reader) refuses, and
raises outside `JSONDecodeError` on others: NaN/Infinity literals, duplicate object keys
(last one silently wins), lone UTF-16 surrogates ("\\ud800"), integers of thousands of digits
(ValueError from int(), or OverflowError later in math.isfinite), floats that overflow to inf,
and nesting deep enough to raise RecursionError. `loads_strict` refuses all of them with a
`StrictJsonError` whose message says what is wrong.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

MAX_INT_DIGITS = 20              # u64 offsets/shapes have at most 20 digits
MAX_DEPTH = 32                   # adapter configs and safetensors headers nest 3-4 deep


class StrictJsonError(ValueError):
    """Malformed or hostile JSON; `duplicate_key_at_top` is set when the top-level object repeats a key."""

    def __init__(self, message: str, duplicate_key_at_top: str | None = None):
        super().__init__(message)
        self.duplicate_key_at_top = duplicate_key_at_top


@dataclass
class _Duplicates:
    found: list[tuple[int, str]]     # (id of the object holding it, key)


def loads_strict(raw: bytes | str) -> object:
    """Parse JSON text, refusing what the module doc lists."""
    try:
        text = raw.decode("utf-8") if isinstance(raw, (bytes, bytearray)) else raw
    except UnicodeDecodeError as error:
        raise StrictJsonError(f"not valid UTF-8 ({error})") from None
    duplicates = _Duplicates([])

    def pairs_hook(pairs: list[tuple[str, object]]) -> dict:
        result = dict(pairs)
        if len(result) != len(pairs):
            seen: set[str] = set()
            first = next(key for key, _ in pairs if key in seen or seen.add(key))
            duplicates.found.append((id(result), first))
        return result

    try:
        value = json.loads(text, object_pairs_hook=pairs_hook, parse_int=_parse_int,
                           parse_float=_parse_float, parse_constant=_refuse_constant)
    except json.JSONDecodeError as error:
        raise StrictJsonError(f"not valid JSON ({error})") from None
    except RecursionError:
        raise StrictJsonError(f"nested too deeply (more than {MAX_DEPTH} levels)") from None
    _check_tree(value)
    for holder, key in duplicates.found:
        top = key if holder == id(value) else None
        raise StrictJsonError(f"the key {_short(key)} appears twice in one object", duplicate_key_at_top=top)
    return value


def _parse_int(text: str) -> int:
    digits = text.lstrip("-")
    if len(digits) > MAX_INT_DIGITS:
        raise StrictJsonError(f"an integer has {len(digits)} digits (at most {MAX_INT_DIGITS} allowed)")
    return int(text)


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise StrictJsonError(f"the number {_short(text)} does not fit a 64-bit float")
    return value


def _refuse_constant(name: str) -> float:
    raise StrictJsonError(f"{name} is not valid JSON (NaN and Infinity are not numbers in JSON)")


def _check_tree(value: object) -> None:
    """Depth <= MAX_DEPTH and no string (key or value) holding a lone surrogate."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            _check_text(item)
            continue
        if not isinstance(item, (dict, list)):
            continue
        if depth > MAX_DEPTH:
            raise StrictJsonError(f"nested too deeply (more than {MAX_DEPTH} levels)")
        if isinstance(item, dict):
            for key, child in item.items():
                _check_text(key)
                stack.append((child, depth + 1))
        else:
            stack.extend((child, depth + 1) for child in item)


def _check_text(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise StrictJsonError(f"the string {_short(text)} holds a lone UTF-16 surrogate (not valid Unicode)") from None


def _short(text: str) -> str:
    return ascii(text if len(text) <= 40 else text[:40] + "...")

"""A `target_modules` regular expression, matched once, under a time bound, at upload.

PEFT matches a string `target_modules` with `re.fullmatch` against every module name. Python's
`re` backtracks and holds the GIL, so a pattern such as `(?:.|.|.)*Z` freezes the whole server
for minutes or forever. Here the pattern is length-bounded, checked for `re` syntax (what PEFT
accepts), then matched with the `regex` engine, which honours a timeout and releases the GIL
(`concurrent=True`). It runs once per upload against the served base's finite list of module
names; validation then uses the resulting set, so no pattern is ever matched again.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

import regex

from .errors import AdapterValidationError
from .types import ATTENTION_MODULES, BaseSpec

MAX_PATTERN_CHARS = 1024
MATCH_BUDGET_S = 0.5            # for all module names of the base together
EMBEDDING_NAMES = ("model.embed_tokens", "lm_head")


@dataclass(frozen=True)
class TargetRegex:
    """The pattern and the full module names of the served base it selects."""

    pattern: str
    selected: frozenset[str]


def module_name(layer_idx: int, parent: str, module: str) -> str:
    return f"model.layers.{layer_idx}.{parent}.{module}"


def match_target_regex(pattern: str, base: BaseSpec, budget_s: float = MATCH_BUDGET_S) -> TargetRegex:
    """Select the base's modules with `pattern`; AdapterValidationError if it is invalid or too slow."""
    if len(pattern) > MAX_PATTERN_CHARS:
        raise _bad(f"is {len(pattern)} characters long; at most {MAX_PATTERN_CHARS} are allowed")
    try:
        re.compile(pattern)
        compiled = regex.compile(pattern, flags=regex.VERSION0)
    except (re.error, regex.error, RecursionError, OverflowError) as error:
        raise _bad(f"is not a valid regex ({error})") from None
    names = [module_name(i, _parent(m), m) for i in range(base.num_layers) for m in base.module_shapes]
    deadline = time.monotonic() + budget_s
    selected = {name for name in EMBEDDING_NAMES + tuple(names) if _fullmatch(compiled, name, deadline)}
    embeddings = selected.intersection(EMBEDDING_NAMES)
    if embeddings:
        raise AdapterValidationError("embedding_target", f"target {pattern!r} is an embedding / lm_head "
                                     f"(it matches {sorted(embeddings)}); LoRA on embeddings is not supported, "
                                     f"only on decoder linear layers")
    return TargetRegex(pattern, frozenset(selected))


def _fullmatch(compiled, name: str, deadline: float) -> bool:
    remaining = deadline - time.monotonic()
    try:
        if remaining <= 0:
            raise TimeoutError
        return compiled.fullmatch(name, timeout=remaining, concurrent=True) is not None
    except TimeoutError:
        raise _bad(f"takes longer than {MATCH_BUDGET_S} s to match the base's module names (catastrophic "
                   f"backtracking); simplify it or list the module names instead") from None


def _parent(module: str) -> str:
    return "self_attn" if module in ATTENTION_MODULES else "mlp"


def _bad(problem: str) -> AdapterValidationError:
    return AdapterValidationError("config_field", f"adapter_config.json: 'target_modules' {problem}")

"""What a request asks for: a `Constraint`, with checks that need no grammar engine."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

CONSTRAINT_KINDS = ("json_schema", "json_object", "regex", "choice", "grammar")


class ConstraintError(ValueError):
    """The constraint cannot be used (invalid, or over a limit); the message says why."""


@dataclass(frozen=True)
class ConstraintLimits:
    """Bounds that keep one request's constraint from stalling the server.

    Beside these, llguidance's own parser limits apply (its defaults): grammar size 500k
    symbols, 1M lexer fuel (~20 ms) to build a grammar's lexer, 200k lexer fuel (~14 ms) and
    50k Earley items per token mask. A constraint over them fails with the limit's name.
    """

    max_source_bytes: int = 64 * 1024     # schema / regex / grammar text, or all choices together
    max_choices: int = 4096
    compile_timeout_s: float = 10.0       # wall time a caller waits for a compile
    cache_size: int = 256                 # compiled grammars kept (LRU by constraint hash)
    max_mask_ms: float = 10.0             # a grammar whose first token mask takes longer is refused,
    #                                       one whose later masks do (on masks.MASK_STRIKES tokens) ended
    max_queued: int = 64                  # grammars waiting to compile, in all
    max_queued_per_tenant: int = 8        # ... and per tenant (served round-robin)

    def __post_init__(self) -> None:
        for name in ("max_source_bytes", "max_choices", "cache_size", "max_queued", "max_queued_per_tenant"):
            if getattr(self, name) < 1:
                raise ValueError(f"ConstraintLimits.{name} must be >= 1")
        if not self.compile_timeout_s > 0:
            raise ValueError("ConstraintLimits.compile_timeout_s must be > 0")
        if not self.max_mask_ms > 0:
            raise ValueError("ConstraintLimits.max_mask_ms must be > 0")


@dataclass(frozen=True)
class Constraint:
    """The output must match this. kind is one of CONSTRAINT_KINDS:

    json_schema: `value` is a JSON Schema (JSON text); json_object: any JSON object (`value`
    empty); regex: `value` is a regular expression the whole output matches; choice: the
    output is exactly one of `choices`; grammar: `value` is a Lark-syntax grammar (llguidance
    dialect, EBNF operators, `start` rule).
    """

    kind: str
    value: str = ""
    choices: tuple[str, ...] = ()

    @property
    def cache_key(self) -> str:
        """sha256 over kind, value and choices: equal constraints share one compiled grammar."""
        digest = hashlib.sha256(self.kind.encode())
        for part in (self.value, *self.choices):
            digest.update(b"\0" + part.encode("utf-8", "surrogatepass"))
        return digest.hexdigest()

    def check(self, limits: ConstraintLimits) -> None:
        """Raise ConstraintError naming the first problem found without compiling."""
        if self.kind not in CONSTRAINT_KINDS:
            raise ConstraintError(f"set one of {', '.join(CONSTRAINT_KINDS)} (got {self.kind!r})")
        size = len(self.value.encode("utf-8", "surrogatepass")) + sum(len(c.encode("utf-8", "surrogatepass"))
                                                                    for c in self.choices)
        if size > limits.max_source_bytes:
            raise ConstraintError(f"the {self.kind} is {size} bytes; the limit is {limits.max_source_bytes}")
        if self.kind == "choice":
            self._check_choices(limits)
        elif self.kind == "json_object":
            if self.value or self.choices:
                raise ConstraintError("json_object takes no schema (use json_schema for one)")
        else:
            if not self.value.strip():
                raise ConstraintError(f"the {self.kind} is empty")
            if self.choices:
                raise ConstraintError(f"{self.kind} takes no choices")
        if self.kind == "json_schema":
            schema_object(self.value)

    def _check_choices(self, limits: ConstraintLimits) -> None:
        if not self.choices:
            raise ConstraintError("choice needs at least one string")
        if len(self.choices) > limits.max_choices:
            raise ConstraintError(f"{len(self.choices)} choices; the limit is {limits.max_choices}")
        if any(not c for c in self.choices):
            raise ConstraintError("choices must be non-empty strings")
        if self.value:
            raise ConstraintError("choice takes its strings in choices, not value")


def schema_object(text: str) -> dict:
    """Parse a JSON Schema's text; it must be a JSON object (or ConstraintError)."""
    try:
        schema = json.loads(text)
    except (ValueError, RecursionError) as error:
        raise ConstraintError(f"the JSON Schema is not valid JSON: {error}") from None
    if not isinstance(schema, dict):
        raise ConstraintError(f"a JSON Schema must be a JSON object (got {type(schema).__name__})")
    return schema

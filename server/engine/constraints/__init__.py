"""Structured output: per-request constraints (JSON Schema, JSON object, regex, choice, Lark
grammar) compiled with llguidance and applied as token bitmasks to the constrained rows only.

- `spec`: the `Constraint` dataclass and its size limits (no llguidance import).
- `compiler`: constraint -> llguidance matcher, off the engine thread, cached by hash.
- `masks`: per-step bitmask computation (overlapped with the forward) and the sampler hook.
"""

from .spec import CONSTRAINT_KINDS, Constraint, ConstraintError, ConstraintLimits

__all__ = ["CONSTRAINT_KINDS", "Constraint", "ConstraintError", "ConstraintLimits"]

"""Memory budgets as users write them: bytes with a unit ("2GiB") or a fraction ("0.3") of the
memory still available. Torch-free, so configuration checks can parse them."""

from __future__ import annotations

import re
from dataclasses import dataclass

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_BUDGET_RE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*", re.ASCII)


@dataclass(frozen=True)
class MemoryBudget:
    """Exactly one of `num_bytes` (absolute) and `fraction` (of available memory) is set."""

    num_bytes: int | None = None
    fraction: float | None = None

    def resolve(self, available_bytes: int) -> int:
        if self.num_bytes is not None:
            return self.num_bytes
        return int(available_bytes * (self.fraction or 0.0))


def parse_memory_budget(value: str | int | float) -> MemoryBudget:
    """'2GiB', '512MiB', '1.5GB', '1000000' (bytes) or '0.3' (a fraction in (0, 1])."""
    text = str(value)
    match = _BUDGET_RE.fullmatch(text)
    unit = match.group(2).lower() if match else ""
    if not match or unit not in _UNITS:
        raise ValueError(f"KV cache memory {text!r} is not understood; use bytes with a unit "
                         "('2GiB', '512MiB', '1.5GB') or a fraction of free memory ('0.3')")
    number = float(match.group(1))
    if not unit and number <= 1.0:
        if number <= 0:
            raise ValueError(f"KV cache memory fraction {text!r} must be in (0, 1]")
        return MemoryBudget(fraction=number)
    if not unit and "." in match.group(1):
        raise ValueError(f"KV cache memory {text!r}: a plain number above 1 means bytes and must "
                         "be an integer; a fraction must be in (0, 1]")
    return MemoryBudget(num_bytes=int(number * _UNITS[unit]))

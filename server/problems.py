"""How every config dataclass reports what is wrong: ConfigProblems with a field path.

A front end (the `serve` CLI, a test) maps each path onto its own name for the setting.
Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Iterator


@dataclass(frozen=True)
class ConfigProblem:
    path: str          # field path inside EngineConfig, e.g. "scheduler.max_num_seqs"
    message: str       # what is wrong, without the field name

    def __str__(self) -> str:
        return f"{self.path} {self.message}"


class InvalidConfig(ValueError):
    """One or more ConfigProblems; str() lists them all."""

    def __init__(self, problems: Iterable[ConfigProblem]):
        self.problems = tuple(problems)
        super().__init__("invalid configuration: " + "; ".join(map(str, self.problems)))


def raise_if(problems: Iterator[ConfigProblem]) -> None:
    found = list(problems)
    if found:
        raise InvalidConfig(found)


def at_least(config: Any, minimum: int, names: Iterable[str]) -> Iterator[ConfigProblem]:
    for name in names:
        value = getattr(config, name)
        if value < minimum:
            yield ConfigProblem(name, f"must be >= {minimum} (got {value})")


def one_of(value: str, choices: tuple[str, ...], name: str) -> Iterator[ConfigProblem]:
    if value not in choices:
        yield ConfigProblem(name, f"must be one of {', '.join(choices)} (got {value!r})")

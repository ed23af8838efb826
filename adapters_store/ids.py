"""Adapter id grammar: names, `name@version` references and `name@version` keys."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import InvalidAdapterId

NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
_NAME_RE = re.compile(NAME_PATTERN, re.ASCII)
_VERSION_RE = re.compile(r"[1-9][0-9]{0,8}", re.ASCII)
_GRAMMAR = "[A-Za-z0-9][A-Za-z0-9._-]{0,127} without '..'"


@dataclass(frozen=True)
class AdapterRef:
    """A parsed reference: `name` (latest READY version) or `name@version` (pinned)."""

    name: str
    version: int | None = None

    def __str__(self) -> str:
        return self.name if self.version is None else make_key(self.name, self.version)


def validate_name(name: str) -> str:
    """Return `name` if it is a valid adapter id, else raise InvalidAdapterId saying why."""
    if not isinstance(name, str) or not name:
        raise InvalidAdapterId("adapter id is empty; use a name matching " + _GRAMMAR)
    if not _NAME_RE.fullmatch(name):
        raise InvalidAdapterId(f"adapter id {name!r} is invalid: use 1-128 characters from "
                               f"[A-Za-z0-9._-], starting with a letter or digit (no '/', no spaces)")
    if ".." in name:
        raise InvalidAdapterId(f"adapter id {name!r} contains '..'; remove it (ids never name paths)")
    return name


def parse_ref(ref: str) -> AdapterRef:
    """Parse `name` or `name@<version>` (version >= 1)."""
    if not isinstance(ref, str):
        raise InvalidAdapterId(f"adapter reference must be a string, got {type(ref).__name__}")
    name, sep, version = ref.partition("@")
    validate_name(name)
    if not sep:
        return AdapterRef(name)
    if not _VERSION_RE.fullmatch(version):
        raise InvalidAdapterId(f"adapter reference {ref!r} has an invalid version {version!r}; "
                               f"use 'name@N' with N a positive integer, or just 'name' for the latest")
    return AdapterRef(name, int(version))


def make_key(name: str, version: int) -> str:
    """The cache/lease key of one version: "name@version"."""
    return f"{name}@{version}"


def parse_key(key: str) -> tuple[str, int]:
    """Inverse of make_key; the version is required."""
    ref = parse_ref(key)
    if ref.version is None:
        raise InvalidAdapterId(f"adapter key {key!r} must pin a version ('name@N')")
    return ref.name, ref.version

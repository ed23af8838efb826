"""Where loraplex keeps what it builds or fetches (default model, store, compiled kernels,
kernel choices): the ground floor of the package, imported by any layer."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """`$LORAPLEX_CACHE`, else `$XDG_CACHE_HOME/loraplex`, else `~/.cache/loraplex`."""
    if os.environ.get("LORAPLEX_CACHE"):
        return Path(os.environ["LORAPLEX_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "loraplex"

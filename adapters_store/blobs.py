"""Content-addressed blob files: `root/blobs/sha256/ab/abcdef...`, written atomically.

A blob reaches its final path only by `rename` of a complete, fsynced file that lives on the
same filesystem (the staging area is inside the store root), followed by an fsync of the
directory; so a blob path always holds complete content. Registry rows are written after
their blobs, and removed before them; orphans left by a crash are removed by `sweep`.
Writers hold the shared GC lock from blob write to row insert; GC holds it exclusively.
"""

from __future__ import annotations

import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from .fsutil import file_lock, fsync_dir, make_dirs

_DIGEST_RE = re.compile(r"[0-9a-f]{64}")


def blob_relpath(digest: str) -> str:
    """Path of a blob relative to the store root."""
    if not _DIGEST_RE.fullmatch(digest):
        raise ValueError(f"not a sha256 hex digest: {digest!r}")
    return f"blobs/sha256/{digest[:2]}/{digest}"


class BlobStore:
    """Blobs under `root/blobs/sha256/`, with the GC lock file `root/gc.lock`."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.blob_root = self.root / "blobs" / "sha256"
        make_dirs(self.blob_root)
        self._lock_path = self.root / "gc.lock"

    def path(self, digest: str) -> Path:
        return self.root / blob_relpath(digest)

    def exists(self, digest: str) -> bool:
        return self.path(digest).is_file()

    @contextmanager
    def writing(self) -> Iterator[None]:
        """Hold while adopting blobs and inserting their rows (GC waits)."""
        with file_lock(self._lock_path, exclusive=False):
            yield

    @contextmanager
    def collecting(self) -> Iterator[None]:
        """Hold while deciding which blobs are unreferenced and removing them (writers wait)."""
        with file_lock(self._lock_path, exclusive=True):
            yield

    def adopt(self, staged: Path, digest: str) -> Path:
        """Move a complete, fsynced staged file to its blob path (or drop it if the blob exists)."""
        target = self.path(digest)
        if target.is_file():
            staged.unlink()
            return target
        make_dirs(target.parent)
        os.rename(staged, target)
        fsync_dir(target.parent)
        return target

    def remove_unreferenced(self, referenced: Callable[[], set[str]]) -> list[str]:
        """Delete blobs (and stray files) no row refers to; returns removed relative paths.

        The caller holds `collecting()`, so no writer is between blob adoption and row insert.
        """
        removed = []
        keep = referenced()
        for directory in sorted(self.blob_root.iterdir()):
            for entry in sorted(directory.iterdir()) if directory.is_dir() else [directory]:
                if entry.name not in keep or entry.parent.name != entry.name[:2]:
                    entry.unlink()
                    removed.append(str(entry.relative_to(self.root)))
            if directory.is_dir() and not any(directory.iterdir()):
                directory.rmdir()
        fsync_dir(self.blob_root)
        return removed

    def total_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.blob_root.glob("*/*") if p.is_file())

"""Content-addressed blobs in a local directory: `root/blobs/sha256/ab/abcdef...`, written atomically.

A blob reaches its final path only by `rename` of a complete, fsynced file that lives on the
same filesystem (the staging area is inside the store root), followed by an fsync of the
directory; so a blob path always holds complete content. Registry rows are written after
their blobs, and removed before them; orphans left by a crash are removed by GC. Writers hold
the registry's shared blob lock from blob write to row insert; GC holds it exclusively.

Every blob backend (this one, blobs_s3.S3BlobStore) offers the same methods: exists, put,
read, remove, list_digests, remove_unreferenced, check, close.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable

from .fsutil import fsync_dir, make_dirs

_DIGEST_RE = re.compile(r"[0-9a-f]{64}")


def blob_relpath(digest: str) -> str:
    """Path of a blob relative to the store root (also the object key below an S3 prefix)."""
    if not is_digest(digest):
        raise ValueError(f"not a sha256 hex digest: {digest!r}")
    return f"blobs/sha256/{digest[:2]}/{digest}"


def is_digest(text: str) -> bool:
    return bool(_DIGEST_RE.fullmatch(text))


class BlobStore:
    """Blobs under `root/blobs/sha256/`."""

    shared = False

    def __init__(self, root: Path):
        self.root = Path(root)
        self.url = str(self.root / "blobs")
        self.blob_root = self.root / "blobs" / "sha256"
        make_dirs(self.blob_root)

    def path(self, digest: str) -> Path:
        return self.root / blob_relpath(digest)

    def check(self) -> None:
        """Raise StoreUnavailable if the backend cannot be used (nothing to check for a directory)."""

    def close(self) -> None:
        """Release clients (nothing for a directory)."""

    def exists(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def put(self, staged: Path, digest: str) -> None:
        """Move a complete, fsynced staged file to its blob path (or drop it if the blob exists)."""
        target = self.path(digest)
        if target.is_file():
            staged.unlink()
            return
        make_dirs(target.parent)
        os.rename(staged, target)
        fsync_dir(target.parent)

    def read(self, digest: str) -> bytes:
        """The blob's bytes (FileNotFoundError if missing); the caller verifies the digest."""
        return self.path(digest).read_bytes()

    def remove(self, digest: str) -> None:
        self.path(digest).unlink(missing_ok=True)

    def list_digests(self) -> set[str]:
        return {p.name for p in self.blob_root.glob("*/*") if p.is_file() and is_digest(p.name)}

    def remove_unreferenced(self, referenced: Callable[[], set[str]]) -> list[str]:
        """Delete blobs (and stray files) no row refers to; returns removed relative paths.

        The caller holds the registry's `collecting()`, so no writer is between blob write and row insert.
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

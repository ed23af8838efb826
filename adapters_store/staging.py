"""Staging directories for files being assembled (uploads, copies from register paths).

Each staging directory lives under `root/tmp/` (same filesystem as the blobs, so a staged
file can be renamed into place) and holds an exclusive flock on its `.lock` file for as long
as its owner is alive. `sweep` removes only directories whose lock is free: those of finished
or killed processes, never those of a live upload in another process.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Callable, ContextManager

from .fsutil import fsync_dir, make_dirs, try_lock_fd

LOCK_NAME = ".lock"


class StagingDir:
    """A private directory of files being written; `close()` removes it."""

    def __init__(self, tmp_root: Path, prefix: str, guard: Callable[[], ContextManager]):
        """`guard` is held while creating and locking (sweep holds its exclusive twin)."""
        make_dirs(tmp_root)
        with guard():
            self._create(tmp_root, prefix)

    def _create(self, tmp_root: Path, prefix: str) -> None:
        self.path = tmp_root / f"{prefix}-{os.getpid()}-{uuid.uuid4().hex}"
        self.path.mkdir()
        lock = self.path / LOCK_NAME
        lock.touch()
        self._lock_fd = try_lock_fd(lock)
        if self._lock_fd is None:
            raise RuntimeError(f"could not lock new staging directory {self.path}")

    def file(self, name: str) -> Path:
        return self.path / name

    def close(self) -> None:
        """Remove the directory and its files (idempotent)."""
        shutil.rmtree(self.path, ignore_errors=True)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


class HashingWriter:
    """Appends to a staged file while counting bytes and hashing them."""

    def __init__(self, path: Path):
        self.path = path
        self._file = open(path, "xb")
        self._hash = hashlib.sha256()
        self.num_bytes = 0

    def write(self, data: bytes) -> None:
        self._file.write(data)
        self._hash.update(data)
        self.num_bytes += len(data)

    def finish(self) -> str:
        """Flush and fsync; returns the sha256 hex digest."""
        if not self._file.closed:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
        return self._hash.hexdigest()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()


def sweep(tmp_root: Path) -> list[str]:
    """Remove staging directories no live process holds; returns their names.

    Call it holding the exclusive twin of the guard StagingDir is created under.
    """
    removed = []
    if not tmp_root.is_dir():
        return removed
    for entry in sorted(tmp_root.iterdir()):
        fd = try_lock_fd(entry / LOCK_NAME) if entry.is_dir() else None
        if entry.is_dir() and fd is None and (entry / LOCK_NAME).exists():
            continue                                    # a live session owns it
        try:
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
            removed.append(entry.name)
        finally:
            if fd is not None:
                os.close(fd)
    if removed:
        fsync_dir(tmp_root)
    return removed

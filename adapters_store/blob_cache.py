"""A local read-through cache of remote blobs on disk, bounded by bytes (least recently read go first).

Files are `dir/<sha256>`, written by rename of a complete temp file; a file whose content no
longer hashes to its name is dropped and fetched again. Several threads may use one cache.
"""

from __future__ import annotations

import hashlib
import os
import threading
import uuid
from pathlib import Path

from .blobs import is_digest
from .fsutil import make_dirs


class BlobCache:
    """Up to `budget_bytes` of blobs under `directory` (0 disables caching)."""

    def __init__(self, directory: Path, budget_bytes: int):
        self.directory = Path(directory)
        self.budget_bytes = budget_bytes
        self._lock = threading.Lock()
        make_dirs(self.directory)
        for stray in self.directory.glob(".tmp-*"):
            stray.unlink(missing_ok=True)

    def get(self, digest: str) -> bytes | None:
        """The cached, verified bytes of `digest`, or None (a corrupt entry is dropped)."""
        path = self.directory / digest
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        if hashlib.sha256(data).hexdigest() != digest:
            path.unlink(missing_ok=True)
            return None
        try:
            os.utime(path)                                 # most recently used
        except FileNotFoundError:
            pass
        return data

    def put_bytes(self, digest: str, data: bytes) -> None:
        if len(data) > self.budget_bytes:
            return
        temp = self.directory / f".tmp-{uuid.uuid4().hex}"
        temp.write_bytes(data)
        self._adopt(temp, digest, len(data))

    def put_file(self, staged: Path, digest: str) -> None:
        """Move a local file that holds `digest` into the cache (or delete it if it does not fit)."""
        size = staged.stat().st_size
        if size > self.budget_bytes:
            staged.unlink(missing_ok=True)
            return
        self._adopt(staged, digest, size)

    def drop(self, digest: str) -> None:
        (self.directory / digest).unlink(missing_ok=True)

    def num_bytes(self) -> int:
        return sum(size for _, size, _ in self._entries())

    def _adopt(self, temp: Path, digest: str, size: int) -> None:
        with self._lock:
            self._evict(self.budget_bytes - size)
            os.replace(temp, self.directory / digest)

    def _evict(self, target_bytes: int) -> None:
        entries = sorted(self._entries(), key=lambda entry: entry[2])          # oldest use first
        total = sum(size for _, size, _ in entries)
        for path, size, _ in entries:
            if total <= target_bytes:
                break
            path.unlink(missing_ok=True)
            total -= size

    def _entries(self) -> list[tuple[Path, int, float]]:
        entries = []
        for path in self.directory.iterdir():
            if not is_digest(path.name):
                continue
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue
            entries.append((path, stat.st_size, stat.st_mtime))
        return entries

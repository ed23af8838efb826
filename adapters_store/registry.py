"""SQLite registry of adapter versions (WAL; safe across threads and processes).

Every call opens a short-lived connection (no connection is shared between threads);
writes run in `BEGIN IMMEDIATE` transactions so concurrent writers serialise on the
database lock instead of failing half-way, and `busy_timeout` makes them wait for it.
"""

from __future__ import annotations

import json
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .blobs import blob_relpath
from .errors import QuotaExceeded, UploadConflict
from .records import AdapterRecord, AdapterState, NewAdapter
from .types import LoraConfigInfo

_SCHEMA = """
CREATE TABLE IF NOT EXISTS names (
    name TEXT PRIMARY KEY, owner TEXT, last_version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS adapters (
    name TEXT NOT NULL, version INTEGER NOT NULL,
    sha256 TEXT NOT NULL, config_sha256 TEXT NOT NULL, size_bytes INTEGER NOT NULL,
    rank INTEGER NOT NULL, lora_alpha REAL NOT NULL, use_rslora INTEGER NOT NULL,
    target_modules TEXT NOT NULL, dtype TEXT NOT NULL, peft_type TEXT NOT NULL,
    base_model TEXT, base_fingerprint TEXT, owner TEXT, private INTEGER NOT NULL,
    created_at REAL NOT NULL, state TEXT NOT NULL, state_reason TEXT NOT NULL DEFAULT '',
    weights_blob TEXT NOT NULL, config_blob TEXT NOT NULL,
    PRIMARY KEY (name, version));
CREATE INDEX IF NOT EXISTS adapters_sha ON adapters (sha256);
"""
_COLUMNS = ("name, version, sha256, config_sha256, size_bytes, rank, lora_alpha, use_rslora, target_modules, "
            "dtype, peft_type, base_model, base_fingerprint, owner, created_at, state, state_reason")


class Registry:
    """Adapter rows keyed by (name, version); versions are monotonic per name, never reused."""

    def __init__(self, path: Path, busy_timeout_ms: int = 30_000):
        self.path = Path(path)
        self.busy_timeout_ms = busy_timeout_ms
        with self._connect() as conn:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.executescript(_SCHEMA)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        conn = sqlite3.connect(self.path, timeout=self.busy_timeout_ms / 1000, isolation_level=None)
        try:
            conn.execute(f"PRAGMA busy_timeout={int(self.busy_timeout_ms)}")
            conn.execute("PRAGMA synchronous=FULL")
            yield conn
        finally:
            conn.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._connect() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    # ---- writes ----------------------------------------------------------------------
    def insert(self, new: NewAdapter, quota_bytes: int) -> AdapterRecord:
        """Insert the next version of `new.name` as READY (quota and ownership checked atomically)."""
        with self._write() as conn:
            used = conn.execute("SELECT COALESCE(SUM(size_bytes), 0) FROM adapters").fetchone()[0]
            if used + new.size_bytes > quota_bytes:
                raise QuotaExceeded(f"storing {new.size_bytes} bytes would exceed the store quota "
                                    f"({used} of {quota_bytes} bytes used); delete unused adapters or "
                                    f"raise --adapter-quota-bytes")
            row = conn.execute("SELECT owner, last_version FROM names WHERE name = ?", (new.name,)).fetchone()
            if row is not None and row[0] != new.owner:
                raise UploadConflict(f"adapter id {new.name!r} is taken; choose another id")
            version = 1 if row is None else row[1] + 1
            conn.execute("INSERT OR REPLACE INTO names (name, owner, last_version) VALUES (?, ?, ?)",
                         (new.name, new.owner, version))
            cfg = new.config
            conn.execute(
                "INSERT INTO adapters (name, version, sha256, config_sha256, size_bytes, rank, lora_alpha, "
                "use_rslora, target_modules, dtype, peft_type, base_model, base_fingerprint, owner, private, "
                "created_at, state, state_reason, weights_blob, config_blob) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, '', ?, ?)",
                (new.name, version, new.sha256, new.config_sha256, new.size_bytes, cfg.rank, cfg.lora_alpha,
                 int(cfg.use_rslora), json.dumps(list(cfg.target_modules)), new.dtype, cfg.peft_type,
                 cfg.base_model, cfg.base_fingerprint, new.owner, int(new.owner is not None), time.time(),
                 AdapterState.READY.value, blob_relpath(new.sha256), blob_relpath(new.config_sha256)))
            return _record(conn.execute(f"SELECT {_COLUMNS} FROM adapters WHERE name = ? AND version = ?",
                                        (new.name, version)).fetchone())

    def set_state(self, name: str, versions: list[int], state: AdapterState, reason: str = "",
                  from_states: tuple[AdapterState, ...] = tuple(AdapterState)) -> list[int]:
        """Move the given versions (those currently in `from_states`) to `state`; returns the moved ones."""
        with self._write() as conn:
            moved = []
            for version in versions:
                row = conn.execute("SELECT state FROM adapters WHERE name = ? AND version = ?",
                                   (name, version)).fetchone()
                if row is not None and AdapterState(row[0]) in from_states:
                    conn.execute("UPDATE adapters SET state = ?, state_reason = ? WHERE name = ? AND version = ?",
                                 (state.value, reason, name, version))
                    moved.append(version)
            return moved

    def delete_rows(self, name: str, versions: list[int]) -> None:
        with self._write() as conn:
            conn.executemany("DELETE FROM adapters WHERE name = ? AND version = ?", [(name, v) for v in versions])

    # ---- reads -----------------------------------------------------------------------
    def get(self, name: str, version: int) -> AdapterRecord | None:
        with self._connect() as conn:
            row = conn.execute(f"SELECT {_COLUMNS} FROM adapters WHERE name = ? AND version = ?",
                               (name, version)).fetchone()
        return None if row is None else _record(row)

    def versions_of(self, name: str) -> list[AdapterRecord]:
        """Every row of `name`, oldest version first."""
        with self._connect() as conn:
            rows = conn.execute(f"SELECT {_COLUMNS} FROM adapters WHERE name = ? ORDER BY version",
                                (name,)).fetchall()
        return [_record(row) for row in rows]

    def all(self) -> list[AdapterRecord]:
        with self._connect() as conn:
            rows = conn.execute(f"SELECT {_COLUMNS} FROM adapters ORDER BY name, version").fetchall()
        return [_record(row) for row in rows]

    def referenced_digests(self) -> set[str]:
        """sha256 of every blob some row refers to (weights and config)."""
        with self._connect() as conn:
            rows = conn.execute("SELECT sha256, config_sha256 FROM adapters").fetchall()
        return {digest for row in rows for digest in row}

    def used_bytes(self) -> int:
        with self._connect() as conn:
            return conn.execute("SELECT COALESCE(SUM(size_bytes), 0) FROM adapters").fetchone()[0]

    def name_owner(self, name: str) -> tuple[bool, str | None]:
        """(whether the name was ever registered, its owner)."""
        with self._connect() as conn:
            row = conn.execute("SELECT owner FROM names WHERE name = ?", (name,)).fetchone()
        return (row is not None, None if row is None else row[0])


def _record(row: tuple) -> AdapterRecord:
    (name, version, sha256, config_sha256, size_bytes, rank, alpha, use_rslora, targets, dtype, peft_type,
     base_model, base_fingerprint, owner, created_at, state, reason) = row
    config = LoraConfigInfo(rank=rank, lora_alpha=alpha, use_rslora=bool(use_rslora),
                            target_modules=tuple(json.loads(targets)), peft_type=peft_type,
                            base_model=base_model, base_fingerprint=base_fingerprint)
    return AdapterRecord(name=name, version=version, sha256=sha256, config_sha256=config_sha256,
                         size_bytes=size_bytes, dtype=dtype, config=config, owner=owner, created_at=created_at,
                         state=AdapterState(state), state_reason=reason)

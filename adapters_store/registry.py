"""The adapter registry: rows of adapter versions, shared logic over SQL connections.

`SqlRegistry` holds every query (written with `?` placeholders); a backend supplies
connections (`_connect` for reads, `_write` for a serialised write transaction), the
store-wide blob lock (`writing` shared / `collecting` exclusive) and the dialect.
`Registry` is the embedded SQLite backend (WAL; safe across threads and processes): every
call opens a short-lived connection and writes run in `BEGIN IMMEDIATE` transactions so
concurrent writers serialise on the database lock; `busy_timeout` makes them wait for it.
The PostgreSQL backend lives in registry_pg.py.
"""

from __future__ import annotations

import json
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .blobs import blob_relpath
from .errors import PUBLIC_WRITE, PermissionDenied, QuotaExceeded, StoreUnavailable, UploadConflict
from .fsutil import file_lock
from .records import AdapterRecord, AdapterState, NewAdapter
from .schema import VERSION_TABLE, migrate
from .types import LoraConfigInfo

_COLUMNS = ("name, version, sha256, config_sha256, size_bytes, rank, lora_alpha, use_rslora, target_modules, "
            "dtype, peft_type, base_model, base_fingerprint, owner, created_at, state, state_reason, "
            "state_changed_at, chat_template, vocab_size, tokenizer_sha256")


class SqlRegistry:
    """Adapter rows keyed by (name, version); versions are monotonic per name, never reused."""

    dialect = "sqlite"
    url = ""                                  # for messages (no password)
    shared = False                            # True when other machines may use the same registry
    migrations_applied: list[int]             # schema versions applied when this registry was opened

    # ---- backend hooks ---------------------------------------------------------------
    @contextmanager
    def _connect(self) -> Iterator:
        raise NotImplementedError

    @contextmanager
    def _write(self) -> Iterator:
        raise NotImplementedError

    @contextmanager
    def writing(self) -> Iterator[None]:
        """Hold (shared) from storing blobs until their rows are inserted: GC waits meanwhile."""
        raise NotImplementedError

    @contextmanager
    def collecting(self) -> Iterator[None]:
        """Hold (exclusive) while deciding which blobs are unreferenced and removing them."""
        raise NotImplementedError

    def close(self) -> None:
        """Release connections (no-op for SQLite)."""

    def _schema_version(self, conn) -> int:
        raise NotImplementedError

    def _migrate(self) -> list[int]:
        with self._write() as conn:
            conn.execute(VERSION_TABLE)
            return migrate(conn, self.dialect, self._schema_version(conn), self.url)

    def schema_version(self) -> int:
        with self._connect() as conn:
            return self._schema_version(conn)

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
            if row is not None and row[0] is None and new.writer_tenant is not None:
                # the rule store._check_owner applies when a write starts, again in this transaction
                raise PermissionDenied(PUBLIC_WRITE.format(name=new.name, action="given new versions"))
            version = 1 if row is None else row[1] + 1
            conn.execute("INSERT INTO names (name, owner, last_version) VALUES (?, ?, ?) ON CONFLICT (name) "
                         "DO UPDATE SET owner = excluded.owner, last_version = excluded.last_version",
                         (new.name, new.owner, version))
            cfg, now = new.config, time.time()
            conn.execute(
                "INSERT INTO adapters (name, version, sha256, config_sha256, size_bytes, rank, lora_alpha, "
                "use_rslora, target_modules, dtype, peft_type, base_model, base_fingerprint, owner, private, "
                "created_at, state, state_reason, weights_blob, config_blob, state_changed_at, chat_template, "
                "vocab_size, tokenizer_sha256) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, '', ?, ?, ?, ?, ?, ?)",
                (new.name, version, new.sha256, new.config_sha256, new.size_bytes, cfg.rank, cfg.lora_alpha,
                 int(cfg.use_rslora), json.dumps(list(cfg.target_modules)), new.dtype, cfg.peft_type,
                 cfg.base_model, cfg.base_fingerprint, new.owner, int(new.owner is not None), now,
                 AdapterState.READY.value, blob_relpath(new.sha256), blob_relpath(new.config_sha256), now,
                 new.chat_template, new.vocab_size, new.tokenizer_sha256))
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
                    conn.execute("UPDATE adapters SET state = ?, state_reason = ?, state_changed_at = ? "
                                 "WHERE name = ? AND version = ?", (state.value, reason, time.time(), name, version))
                    moved.append(version)
            return moved

    def delete_rows(self, name: str, versions: list[int]) -> None:
        with self._write() as conn:
            for version in versions:
                conn.execute("DELETE FROM adapters WHERE name = ? AND version = ?", (name, version))

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

    def names(self) -> list[tuple[str, str | None, int]]:
        """(name, owner, last_version) of every name ever registered."""
        with self._connect() as conn:
            return [tuple(row) for row in conn.execute("SELECT name, owner, last_version FROM names "
                                                       "ORDER BY name").fetchall()]

    def referenced_digests(self) -> set[str]:
        """sha256 of every blob some row refers to (weights, config, tokenizer), whatever its state."""
        with self._connect() as conn:
            rows = conn.execute("SELECT sha256, config_sha256, tokenizer_sha256 FROM adapters").fetchall()
        return {digest for row in rows for digest in row if digest}

    def used_bytes(self) -> int:
        with self._connect() as conn:
            return int(conn.execute("SELECT COALESCE(SUM(size_bytes), 0) FROM adapters").fetchone()[0])

    def name_owner(self, name: str) -> tuple[bool, str | None]:
        """(whether the name was ever registered, its owner)."""
        with self._connect() as conn:
            row = conn.execute("SELECT owner FROM names WHERE name = ?", (name,)).fetchone()
        return (row is not None, None if row is None else row[0])


class Registry(SqlRegistry):
    """The embedded SQLite registry (`path`), with the blob lock on `gc.lock` beside it."""

    def __init__(self, path: Path, busy_timeout_ms: int = 30_000):
        self.path = Path(path)
        self.url = str(self.path)
        self.busy_timeout_ms = busy_timeout_ms
        self._lock_path = self.path.parent / "gc.lock"
        with self._connect() as conn:
            conn.execute("PRAGMA journal_mode=WAL")
        self.migrations_applied = self._migrate()

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        try:
            conn = sqlite3.connect(self.path, timeout=self.busy_timeout_ms / 1000, isolation_level=None)
        except sqlite3.OperationalError as error:
            raise StoreUnavailable(f"cannot open the adapter registry {self.path}: {error}") from None
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

    @contextmanager
    def writing(self) -> Iterator[None]:
        with file_lock(self._lock_path, exclusive=False):
            yield

    @contextmanager
    def collecting(self) -> Iterator[None]:
        with file_lock(self._lock_path, exclusive=True):
            yield

    def _schema_version(self, conn) -> int:
        tables = {row[0] for row in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name IN ('schema_version', 'adapters')")}
        if "schema_version" in tables:
            row = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()
            if row[0] is not None:
                return int(row[0])
        return 1 if "adapters" in tables else 0


def _record(row: tuple) -> AdapterRecord:
    (name, version, sha256, config_sha256, size_bytes, rank, alpha, use_rslora, targets, dtype, peft_type,
     base_model, base_fingerprint, owner, created_at, state, reason, changed_at, chat_template, vocab_size,
     tokenizer_sha256) = row
    config = LoraConfigInfo(rank=int(rank), lora_alpha=float(alpha), use_rslora=bool(use_rslora),
                            target_modules=tuple(json.loads(targets)), peft_type=peft_type,
                            base_model=base_model, base_fingerprint=base_fingerprint)
    return AdapterRecord(name=name, version=int(version), sha256=sha256, config_sha256=config_sha256,
                         size_bytes=int(size_bytes), dtype=dtype, config=config, owner=owner,
                         created_at=float(created_at), state=AdapterState(state), state_reason=reason,
                         state_changed_at=float(changed_at), chat_template=chat_template or None,
                         vocab_size=int(vocab_size or 0), tokenizer_sha256=tokenizer_sha256 or None)

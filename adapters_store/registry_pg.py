"""PostgreSQL registry backend (psycopg 3 + psycopg_pool), for a store shared by many servers.

Every write transaction first takes one transaction-level advisory lock, so writes serialise
exactly like SQLite's `BEGIN IMMEDIATE` (versions assigned once, quota checked atomically),
from any number of servers. The blob lock is a session-level advisory lock (shared for
writers, exclusive for GC) held on a dedicated connection: PostgreSQL drops it when the
holder's connection dies, so a killed server never blocks GC. Migrations run at start in a
write transaction, so concurrent starts apply them once.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from .breaker import BackendDown, Breaker
from .errors import StoreUnavailable
from .registry import SqlRegistry
from .urls import redact_url

_WRITE_LOCK = 7_304_105_001                  # advisory lock keys (arbitrary, fixed)
_BLOB_LOCK = 7_304_105_002


class _Conn:
    """A psycopg connection that speaks the `?` placeholders of SqlRegistry's queries."""

    def __init__(self, conn):
        self._conn = conn

    def execute(self, sql: str, params: tuple = ()):
        return self._conn.execute(sql.replace("?", "%s"), params)


class PostgresRegistry(SqlRegistry):
    """The registry in a PostgreSQL database given by a `postgresql://` URL."""

    dialect = "postgres"
    shared = True

    def __init__(self, url: str, pool_size: int = 8, timeout_s: float = 10.0, breaker: Breaker | None = None):
        """breaker: fails calls fast during an outage (default: one probe per second, each
        probe waiting at most min(2 s, timeout_s) for a connection)."""
        import psycopg
        from psycopg_pool import ConnectionPool

        self._psycopg = psycopg
        self._raw_url = url
        self.url = redact_url(url)
        self._timeout_s = timeout_s
        self._probe_timeout_s = min(2.0, timeout_s)
        self._breaker = breaker or Breaker()
        try:                                           # one direct attempt first: a clear reason, no retries
            psycopg.connect(url, connect_timeout=max(1, int(timeout_s / 2))).close()
        except psycopg.Error as error:
            raise StoreUnavailable(f"cannot connect to the adapter registry {self.url}: {_reason(error)}; "
                                   f"check the URL, that PostgreSQL runs and accepts this user") from None
        self._pool = ConnectionPool(url, min_size=1, max_size=pool_size, timeout=timeout_s, open=False,
                                    check=ConnectionPool.check_connection,
                                    kwargs={"connect_timeout": max(1, int(timeout_s / 2))},
                                    name="loraplex-registry")
        try:
            self._pool.open(wait=True, timeout=timeout_s)
        except Exception as error:  # noqa: BLE001 - PoolTimeout, OperationalError: reported with the URL
            self._pool.close()
            raise StoreUnavailable(f"cannot connect to the adapter registry {self.url}: "
                                   f"{_reason(error)}; check the URL, that PostgreSQL runs and accepts "
                                   f"this user") from None
        self.migrations_applied = self._migrate()

    def close(self) -> None:
        self._pool.close()

    @contextmanager
    def _connect(self) -> Iterator[_Conn]:
        with self._unavailable_on_error() as wait_s:
            with self._pool.connection(timeout=wait_s) as conn:
                yield _Conn(conn)

    @contextmanager
    def _write(self) -> Iterator[_Conn]:
        with self._unavailable_on_error() as wait_s:
            with self._pool.connection(timeout=wait_s) as conn:
                with conn.transaction():
                    conn.execute("SELECT pg_advisory_xact_lock(%s)", (_WRITE_LOCK,))
                    yield _Conn(conn)

    @contextmanager
    def writing(self) -> Iterator[None]:
        with self._session_lock("pg_advisory_lock_shared", "pg_advisory_unlock_shared"):
            yield

    @contextmanager
    def collecting(self) -> Iterator[None]:
        with self._session_lock("pg_advisory_lock", "pg_advisory_unlock"):
            yield

    def _schema_version(self, conn) -> int:
        row = conn.execute("SELECT to_regclass('schema_version') IS NOT NULL, "
                           "to_regclass('adapters') IS NOT NULL").fetchone()
        if row[0]:
            found = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()[0]
            if found is not None:
                return int(found)
        return 1 if row[1] else 0

    @contextmanager
    def _session_lock(self, lock: str, unlock: str) -> Iterator[None]:
        with self._unavailable_on_error() as wait_s:
            conn = self._psycopg.connect(self._raw_url, autocommit=True,
                                         connect_timeout=max(1, int(wait_s / 2)))
        try:
            with self._unavailable_on_error():
                conn.execute(f"SELECT {lock}(%s)", (_BLOB_LOCK,))
            yield
            try:
                conn.execute(f"SELECT {unlock}(%s)", (_BLOB_LOCK,))
            except self._psycopg.Error:
                pass                                   # closing the session releases it anyway
        finally:
            conn.close()

    @contextmanager
    def _unavailable_on_error(self) -> Iterator[float]:
        """Yields how long the call may wait for a connection (short when it probes a registry
        that failed recently); StoreUnavailable at once while the breaker is open, and when the
        call fails to reach PostgreSQL (which opens it)."""
        from psycopg_pool import PoolTimeout

        try:
            probe = self._breaker.admit()
        except BackendDown as down:
            raise StoreUnavailable(f"the adapter registry {self.url} is unreachable ({down}); "
                                   f"retry shortly") from None
        try:
            yield self._probe_timeout_s if probe else self._timeout_s
        except (self._psycopg.OperationalError, self._psycopg.InterfaceError, PoolTimeout) as error:
            if getattr(error, "sqlstate", None) is None:
                self._breaker.failed()                 # no connection; not an error PostgreSQL sent
            else:
                self._breaker.succeeded()              # e.g. a cancelled statement: it answered
            raise StoreUnavailable(f"the adapter registry {self.url} is unreachable ({_reason(error)}); "
                                   f"retry shortly") from None
        except BaseException:
            self._breaker.succeeded()                  # it answered (an SQL or caller error)
            raise
        self._breaker.succeeded()


def _reason(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text[:300]

"""Registry schema versions and their ordered migrations (SQLite and PostgreSQL dialects).

Version 1 is the schema of the first release (no version table: detected by its `adapters`
table). Each later migration moves the schema one version up; `migrate` applies the missing
ones in order, inside one transaction that the caller runs under the registry's write lock,
and refuses a schema newer than CURRENT_VERSION.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import SchemaError

_V1_SQLITE = """
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
_V1_POSTGRES = (_V1_SQLITE.replace(" REAL ", " DOUBLE PRECISION ").replace("INTEGER", "BIGINT"))
_V2 = "ALTER TABLE adapters ADD COLUMN state_changed_at {real} NOT NULL DEFAULT 0"
_V3 = "ALTER TABLE adapters ADD COLUMN chat_template TEXT"
_V4 = ("ALTER TABLE adapters ADD COLUMN vocab_size {int} NOT NULL DEFAULT 0; "
       "ALTER TABLE adapters ADD COLUMN tokenizer_sha256 TEXT")


@dataclass(frozen=True)
class Migration:
    """Moves the schema from `version - 1` to `version`."""

    version: int
    description: str
    sqlite: str
    postgres: str


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "adapters and names tables", _V1_SQLITE, _V1_POSTGRES),
    Migration(2, "adapters.state_changed_at (when a row entered its state; GC grace for DELETING rows)",
              _V2.format(real="REAL"), _V2.format(real="DOUBLE PRECISION")),
    Migration(3, "adapters.chat_template (an adapter's own chat template; NULL: the base model's)", _V3, _V3),
    Migration(4, "adapters.vocab_size, adapters.tokenizer_sha256 (a resized vocabulary's size and the blob of "
              "its tokenizer files; 0 / NULL: the base's)", _V4.format(int="INTEGER"), _V4.format(int="BIGINT")),
)
CURRENT_VERSION = MIGRATIONS[-1].version
VERSION_TABLE = "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)"


def pending(found: int, where: str) -> list[Migration]:
    """The migrations to apply to a schema at version `found` (SchemaError if it is newer)."""
    if found > CURRENT_VERSION:
        raise SchemaError(f"the adapter registry at {where} has schema version {found}, newer than this "
                          f"loraplex knows ({CURRENT_VERSION}); upgrade loraplex on this server (a newer "
                          f"release wrote this store), never downgrade a shared store")
    return [m for m in MIGRATIONS if m.version > found]


def migrate(conn, dialect: str, found: int, where: str) -> list[int]:
    """Apply the pending migrations on `conn` (in the caller's transaction); the versions applied."""
    steps = pending(found, where)
    for step in steps:
        script = step.sqlite if dialect == "sqlite" else step.postgres
        for statement in filter(None, (s.strip() for s in script.split(";"))):
            conn.execute(statement)
    if steps:
        conn.execute("DELETE FROM schema_version")
        conn.execute(f"INSERT INTO schema_version (version) VALUES ({CURRENT_VERSION})")
    return [step.version for step in steps]

"""Real backing services for tests: PostgreSQL (the `pgserver` wheel) and S3 (moto's threaded server).

Both listen on loopback only (PostgreSQL on a unix socket inside its data directory, moto on
127.0.0.1 with a free port), can be stopped and started again (outage tests), and hand out a
fresh database / bucket prefix per test. pgserver refuses nothing as root: it creates an
unprivileged `pgserver` system user and runs PostgreSQL as that user.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

AWS_TEST_ENV = {"AWS_ACCESS_KEY_ID": "loraplex-test", "AWS_SECRET_ACCESS_KEY": "loraplex-test-secret",
                "AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": os.devnull,
                "AWS_SHARED_CREDENTIALS_FILE": os.devnull, "AWS_EC2_METADATA_DISABLED": "true"}


class PostgresService:
    """A throw-away PostgreSQL server; `new_database()` -> a postgresql:// URL of an empty database."""

    def __init__(self, base_dir: Path | None = None):
        import pgserver

        base = Path(tempfile.mkdtemp(prefix="loraplex-pg-", dir=base_dir))
        os.chmod(base, 0o755)
        self.pgdata = base / "data"
        self._server = pgserver.get_server(self.pgdata, cleanup_mode="delete")
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as conn:     # a test server: speed over durability
            conn.execute("ALTER SYSTEM SET fsync = off")
            conn.execute("ALTER SYSTEM SET synchronous_commit = off")
            conn.execute("SELECT pg_reload_conf()")

    def url(self, database: str = "postgres") -> str:
        return self._server.get_uri(database)

    def new_database(self) -> str:
        import psycopg

        name = f"t_{uuid.uuid4().hex[:16]}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def stop(self) -> None:
        """Stop PostgreSQL (fast shutdown: clients are disconnected); start() brings it back."""
        from pgserver._commands import pg_ctl

        pg_ctl(["-w", "-m", "fast", "stop"], pgdata=self.pgdata, user=self._server.system_user)

    def start(self) -> None:
        self._server.ensure_postgres_running()
        info = self._server.get_postmaster_info()
        assert info.is_running()

    def close(self) -> None:
        try:
            self.stop()
        except Exception:  # noqa: BLE001 - already stopped (an outage test); cleanup still runs
            pass
        finally:
            self._server.cleanup()


@dataclass
class S3Service:
    """moto's S3 on 127.0.0.1; `env` holds the AWS_* variables that point boto3 at it."""

    bucket: str = "loraplex-test"
    env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        import logging

        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.WARNING)           # one line per request otherwise
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        host, self.port = self._server.get_host_and_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.env = {**AWS_TEST_ENV, "AWS_ENDPOINT_URL": self.endpoint}
        self.client().create_bucket(Bucket=self.bucket)

    def client(self):
        import boto3

        return boto3.session.Session(aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
                                     aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"],
                                     region_name="us-east-1").client("s3", endpoint_url=self.endpoint)

    def new_prefix(self) -> str:
        """An s3:// URL of an empty prefix in the test bucket."""
        return f"s3://{self.bucket}/t-{uuid.uuid4().hex[:12]}"

    def stop(self) -> None:
        """Stop answering (objects are kept in memory); start() listens on the same port again."""
        self._server.stop()

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()

    def close(self) -> None:
        self._server.stop()

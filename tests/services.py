"""Real backing services for tests: PostgreSQL (the `pgserver` wheel) and S3 (moto's threaded server).

Both listen on loopback only (PostgreSQL on a unix socket inside its data directory, moto on
127.0.0.1 with a free port, behind a proxy that can cut connections), can be stopped and started again (outage tests), and hand out a
fresh database / bucket prefix per test. pgserver refuses nothing as root: it creates an
unprivileged `pgserver` system user and runs PostgreSQL as that user.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import threading
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
        self._base = base
        self.pgdata = base / "data"
        self._server = pgserver.get_server(self.pgdata, cleanup_mode="delete")
        self._socket_dir = self._server.get_postmaster_info().socket_dir   # start() listens there again
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
        self._pg_ctl(["-w", "-m", "fast", "stop"])

    def start(self) -> None:
        from pgserver.utils import PostmasterInfo

        self._pg_ctl(["-w", "-o", '-h ""', "-o", f"-k {self._socket_dir}", "-l", str(self._server.log), "start"])
        info = PostmasterInfo.read_from_pgdata(self.pgdata)
        assert info is not None and info.is_running() and info.status == "ready"
        self._server._postmaster_info = info          # pgserver's cleanup() stops the new postmaster

    def _pg_ctl(self, args: list[str]) -> None:
        """Run pg_ctl as the PostgreSQL user without fork() in this process.

        pgserver's own helper passes `user=` to subprocess, which makes Python fork() (never vfork)
        and run every pthread_atfork handler of this multi-threaded process (gRPC, OpenMP) in the
        child; under gRPC traffic that child once died with SIGSEGV before exec (a CI failure).
        `runuser` switches the user after exec instead, and subprocess can use vfork."""
        from pgserver._commands import POSTGRES_BIN_PATH

        command = [str(POSTGRES_BIN_PATH / "pg_ctl"), "-D", str(self.pgdata), *args]
        user = self._server.system_user
        if user is not None:
            command = ["runuser", "-u", user, "--", *command]
        result = subprocess.run(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, timeout=120)
        if result.returncode != 0:
            log = Path(self._server.log).read_text(errors="replace")[-4000:]
            raise RuntimeError(f"pg_ctl {args[-1]} failed ({result.returncode}): {result.stderr}\n{log}")

    def close(self) -> None:
        try:
            self.stop()
        except Exception:  # noqa: BLE001 - already stopped (an outage test); cleanup still runs
            pass
        finally:
            self._server.cleanup()                   # deletes pgdata, not the directory above it
            shutil.rmtree(self._base, ignore_errors=True)


class TcpProxy:
    """A loopback TCP proxy to `target_port` that can be cut: stop() closes the listener and every
    open connection (clients then see refused connections, not a hang), start() listens again on
    the same port. It stands in front of moto, whose own shutdown keeps keep-alive connections."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.port = 0
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self.start()

    def start(self) -> None:
        listener = socket.create_server(("127.0.0.1", self.port))
        self.port = listener.getsockname()[1]
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def stop(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        with self._lock:
            sockets, self._sockets = self._sockets, set()
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets.update((client, upstream))
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            with self._lock:
                self._sockets.discard(src)
                self._sockets.discard(dst)


@dataclass
class S3Service:
    """moto's S3 on 127.0.0.1 behind a TcpProxy; `env` holds the AWS_* variables that point boto3 at it."""

    bucket: str = "loraplex-test"
    env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        import logging

        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.WARNING)           # one line per request otherwise
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        _, moto_port = self._server.get_host_and_port()
        self._proxy = TcpProxy(moto_port)
        self.port = self._proxy.port
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
        """Cut the endpoint (objects are kept); start() serves them again on the same port."""
        self._proxy.stop()

    def start(self) -> None:
        self._proxy.start()

    def close(self) -> None:
        self._proxy.stop()
        self._server.stop()

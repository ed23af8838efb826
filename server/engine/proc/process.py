"""One engine-core process and the two ZeroMQ pipes the front end holds to it.

The process is started with `spawn` (a fresh interpreter: a fork of a front end that already
runs torch, gRPC and asyncio threads is unsafe). Each incarnation gets its own ipc:// sockets in
a private temporary directory, so nothing sent to a dead core reaches its successor.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import shutil
import tempfile
import threading
from typing import Any, Callable

import zmq

from .core import CoreSpec, run_core

# libgomp (torch's OpenMP runtime) spins this many iterations at a barrier before it sleeps.
# Its default in a process with one OpenMP team is ~300,000 (~3 ms): on a machine whose other
# processes want the CPUs, a thread spinning for a preempted partner burns its time slice at each
# of a decode step's ~120 parallel regions (measured at load ~15 on 2 cores: 1-2 tok/s against
# 18 with 1000). On a quiet AMD EPYC 1000 decodes as fast as the default (docs/server.md).
CORE_SPIN_COUNT = "1000"
_ENV_LOCK = threading.Lock()


@contextlib.contextmanager
def core_environment():
    """os.environ as the spawned core inherits it (libgomp reads it once, when torch loads):
    GOMP_SPINCOUNT=CORE_SPIN_COUNT unless the operator set GOMP_SPINCOUNT or OMP_WAIT_POLICY."""
    with _ENV_LOCK:
        chosen = "GOMP_SPINCOUNT" in os.environ or "OMP_WAIT_POLICY" in os.environ
        if not chosen:
            os.environ["GOMP_SPINCOUNT"] = CORE_SPIN_COUNT
        try:
            yield
        finally:
            if not chosen:
                os.environ.pop("GOMP_SPINCOUNT", None)


class CoreExited(RuntimeError):
    """The engine-core process ended (or failed to start)."""


class CoreProcess:
    """Spawn the core, send it messages (any thread), receive its messages (one thread)."""

    def __init__(self, context: zmq.Context, engine_config: Any, store_factory: Callable[[], Any] | None,
                 log_level: str = "INFO"):
        self._dir = tempfile.mkdtemp(prefix="loraplex-engine-")     # mode 0700: this user only
        to_core, from_core = f"ipc://{self._dir}/to-core", f"ipc://{self._dir}/from-core"
        self._sender, self.receiver = context.socket(zmq.PUSH), context.socket(zmq.PULL)
        for sock in (self._sender, self.receiver):
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, 0)
            sock.setsockopt(zmq.RCVHWM, 0)
        self._lock = threading.Lock()
        try:
            self._sender.bind(to_core)
            self.receiver.bind(from_core)
            spec = CoreSpec(engine_config, store_factory, to_core, from_core, log_level)
            self.process = multiprocessing.get_context("spawn").Process(
                target=run_core, args=(spec,), name="loraplex-engine-core", daemon=True)
            with core_environment():
                self.process.start()
        except BaseException:
            self._close_pipes()      # an open socket would block the front end's zmq.Context.term()
            raise

    @property
    def pid(self) -> int | None:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.is_alive()

    def send(self, data: bytes) -> None:
        """Queue one message for the core (thread-safe; never blocks: the queue is unbounded)."""
        with self._lock:
            if self._sender.closed:
                raise CoreExited("the engine process is gone")
            self._sender.send(data, zmq.NOBLOCK)

    def recv(self, timeout_ms: int) -> bytes | None:
        """The next message from the core, or None after timeout_ms (receiving thread only)."""
        if self.receiver.poll(timeout_ms, zmq.POLLIN):
            return self.receiver.recv()
        return None

    def stop(self, shutdown_message: bytes | None, timeout_s: float = 30.0) -> int | None:
        """Ask the core to exit (Shutdown, then SIGTERM), each given timeout_s, then kill it; close
        the pipes. The exit code."""
        if shutdown_message is not None and self.alive():
            try:
                self.send(shutdown_message)
            except (zmq.ZMQError, CoreExited):
                pass
            self.process.join(timeout_s)
        if self.process.is_alive():          # not reading (still building): SIGTERM unwinds it
            self.process.terminate()
            self.process.join(timeout_s)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(10)
        self._close_pipes()
        return self.process.exitcode

    def _close_pipes(self) -> None:
        with self._lock:
            self._sender.close(0)
        self.receiver.close(0)
        shutil.rmtree(self._dir, ignore_errors=True)

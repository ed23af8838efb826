"""One engine-core process and the two ZeroMQ pipes the front end holds to it.

The process is started with `spawn` (a fresh interpreter: a fork of a front end that already
runs torch, gRPC and asyncio threads is unsafe). Each incarnation gets its own ipc:// sockets in
a private temporary directory, so nothing sent to a dead core reaches its successor.
"""

from __future__ import annotations

import multiprocessing
import shutil
import tempfile
import threading
from typing import Any, Callable

import zmq

from .core import CoreSpec, run_core


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
        self._sender.bind(to_core)
        self.receiver.bind(from_core)
        self._lock = threading.Lock()
        spec = CoreSpec(engine_config, store_factory, to_core, from_core, log_level)
        self.process = multiprocessing.get_context("spawn").Process(
            target=run_core, args=(spec,), name="loraplex-engine-core", daemon=True)
        self.process.start()

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
        with self._lock:
            self._sender.close(0)
        self.receiver.close(0)
        shutil.rmtree(self._dir, ignore_errors=True)
        return self.process.exitcode

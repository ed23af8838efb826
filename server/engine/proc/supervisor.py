"""CoreSupervisor: keeps one engine-core process running for the front end.

It starts the core and waits for its Ready, reads the core's messages on a receiver thread and
hands them to the client, notices the core's death within POLL_MS, and starts a successor
(retrying failed starts with a back-off) until it is stopped.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from typing import Any, Callable

import zmq

from . import wire
from .process import CoreExited, CoreProcess

log = logging.getLogger("loraplex.engine.client")

POLL_MS = 100                 # how often the receiver thread checks that the core still lives
RESTART_BACKOFF_S = (0.5, 1, 2, 5, 10, 30)


class CoreSupervisor:
    """on_ready(Ready) after each start; on_message(message) for everything else the core sends
    (receiver thread); on_death(exit code) once per death, before the restart."""

    def __init__(self, spawn: Callable[[], CoreProcess], on_ready: Callable[[wire.Ready], None],
                 on_message: Callable[[Any], None], on_death: Callable[[int | None], None]):
        self._spawn, self._on_ready, self._on_message, self._on_death = spawn, on_ready, on_message, on_death
        self._decoder = wire.front_codec()
        self._core: CoreProcess | None = None
        self._stopping = False
        self._thread = threading.Thread(target=self._receive_loop, name="loraplex-engine-client", daemon=True)

    @property
    def pid(self) -> int | None:
        core = self._core
        return core.pid if core is not None else None

    def start(self) -> None:
        """Start the first core (blocking until Ready; CoreExited if it fails), then supervise it."""
        self._start_core()
        self._thread.start()

    def send(self, data: bytes) -> None:
        """Send to the current core; CoreExited when there is none or it is gone."""
        core = self._core
        if core is None:
            raise CoreExited("no engine process is running")
        try:
            core.send(data)
        except zmq.ZMQError as error:
            raise CoreExited(f"the engine process cannot be reached: {error}") from None

    def stop(self, shutdown_message: bytes, timeout_s: float = 30.0) -> None:
        """Stop supervising; ask the core to exit (killed after timeout_s). Blocking."""
        self._stopping = True
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        core, self._core = self._core, None
        if core is not None:
            core.stop(shutdown_message, timeout_s)

    # ---- receiver thread ----------------------------------------------------------------------
    def _start_core(self) -> None:
        core = self._spawn()
        self._core = core
        while True:
            data = core.recv(POLL_MS)
            if data is None:
                if self._stopping or not core.alive():
                    code = core.stop(None)
                    raise CoreExited(f"the engine process exited with code {code} while starting")
                continue
            message = self._decoder.decode(data)
            if isinstance(message, wire.StartFailed):
                core.stop(None)
                raise CoreExited(f"the engine process could not start: {message.message}")
            if isinstance(message, wire.Ready):
                self._on_ready(message)
                return

    def _receive_loop(self) -> None:
        while not self._stopping:
            core = self._core
            data = core.recv(POLL_MS) if core is not None else None
            if data is not None:
                self._on_message(self._decoder.decode(data))
            elif core is not None and not core.alive() and not self._stopping:
                self._restart(core)

    def _restart(self, core: CoreProcess) -> None:
        self._on_death(core.stop(None))
        for attempt in itertools.count():
            if self._stopping:
                return
            try:
                self._start_core()
                return
            except CoreExited as failure:
                delay = RESTART_BACKOFF_S[min(attempt, len(RESTART_BACKOFF_S) - 1)]
                log.error("restarting the engine process failed (%s); next try in %gs", failure, delay)
                time.sleep(delay)

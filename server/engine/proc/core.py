"""The engine-core process: builds the LLMEngine on its MAIN thread and steps it there.

Why a process of its own (issue 36): on 2-core CPUs a torch op run from a second Python thread
pays a new OpenMP team per parallel region (F.linear 1x576x1536: ~31 us on the main thread,
~120 us on another), so the in-process step thread decoded at 0.65x the engine's own speed; and
one process shared the GIL between the event loop, the tokenizer and the step loop.

`run_core(spec)` is the spawned process's entry point. It talks to the front end over two ZeroMQ
PUSH/PULL pipes (wire.py): requests, aborts and named commands in; per-step outputs, stats and
hook events out. It exits when told (Shutdown), or when the front end's process is gone (a thread
waits on the parent's sentinel: no orphans). Once serving, SIGINT/SIGTERM are ignored here: the
front end drains and then shuts the core down, so a Ctrl-C or a SIGTERM sent to the whole
process group cannot cut in-flight requests short. While the engine is being built, SIGTERM
exits cleanly (the front end's stop before Ready).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable

import zmq

from . import wire
from ..io import RequestRejected, ValidatedRequest

log = logging.getLogger("loraplex.engine.core")

IDLE_POLL_MS = 250          # idle: wake at least this often (pending grammar compiles, parent check)
BUILD_EXIT_S = 30           # the front end died while we were building: time to unwind cleanly
ADAPTER_WAIT_MS = 5         # every request waits on an adapter load: let the loader threads run


@dataclass(frozen=True)
class CoreSpec:
    """Everything the spawned process needs (pickled by multiprocessing's spawn, once)."""

    engine_config: Any                          # EngineConfig
    store_factory: Callable[[], Any] | None     # opens the adapter store in this process
    to_core: str                                # zmq address the core PULLs from
    from_core: str                              # zmq address the core PUSHes to
    log_level: str = "INFO"


def run_core(spec: CoreSpec) -> None:
    """Process entry point: build, report Ready (or StartFailed), then serve until Shutdown."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _exit_cleanly)      # until Ready: see _exit_cleanly
    ready = threading.Event()
    _exit_with_parent(ready)
    logging.basicConfig(level=spec.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from ...host_tuning import tune_malloc

    log.info("engine core: %s", tune_malloc())     # the step's allocations, as `serve` tunes its own
    context = zmq.Context()
    inbox, outbox = context.socket(zmq.PULL), context.socket(zmq.PUSH)
    for sock in (inbox, outbox):
        sock.setsockopt(zmq.LINGER, 1000)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
    inbox.connect(spec.to_core)
    outbox.connect(spec.from_core)
    codec = wire.core_codec()
    try:
        from ..builder import build_engine

        store = spec.store_factory() if spec.store_factory is not None else None
        # Token ids out: the front end detokenizes and matches stop strings (text_stream.py).
        engine, info = build_engine(spec.engine_config, store, lambda message: print(message, flush=True),
                                    detokenize=False)
    except Exception as error:  # noqa: BLE001 - reported to the front end, which raises it
        log.exception("the engine could not be built")
        outbox.send(codec.encode(wire.StartFailed(f"{type(error).__name__}: {error}")))
        outbox.close()
        return
    signal.signal(signal.SIGTERM, signal.SIG_IGN)      # serving: only the front end stops us
    ready.set()
    outbox.send(codec.encode(wire.Ready(wire.info_to_wire(info), os.getpid())))
    try:
        EngineCore(engine, store, inbox, outbox, codec).run()
    finally:
        if store is not None and hasattr(store, "close"):
            store.close()
        inbox.close(0)
        outbox.close()
        context.term()


def _exit_cleanly(_signum: int, _frame: Any) -> None:
    """SIGTERM while the engine is being built (the front end is stopping before it was ready):
    unwind with SystemExit, so that `finally` blocks run; above all the file lock of a fused
    kernel build in the shared cache, which a killed build would leave held forever."""
    raise SystemExit(0)


def _exit_with_parent(ready: threading.Event) -> None:
    """Exit when the front end's process ends, however it ends (SIGKILL included): at once when
    serving; while building, through SIGTERM first (_exit_cleanly), at most BUILD_EXIT_S later."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        multiprocessing.connection.wait([parent.sentinel])
        if not ready.is_set():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(BUILD_EXIT_S)
        os._exit(0)

    threading.Thread(target=watch, name="loraplex-parent-watch", daemon=True).start()


class EngineCore:
    """The step loop on the calling (main) thread; every engine call happens here."""

    def __init__(self, engine: Any, store: Any, inbox: zmq.Socket, outbox: zmq.Socket, codec: wire.Codec):
        self.engine = engine
        self.inbox, self.outbox, self.codec = inbox, outbox, codec
        self._stopping = False
        self._compiling: list[tuple[wire.Add, Future, float]] = []
        self._events: list[wire.Event] = []
        self._events_lock = threading.Lock()
        self._private: frozenset[str] = frozenset()
        self._last_stats = None
        self._commands = {"evict_adapters": self._evict_adapters, "warm_adapter": self._warm_adapter,
                          "reset_prefix_cache": self._reset_prefix_cache}
        self._install_hooks(store)

    # ---- hooks: events of other threads are queued and sent from this one ------------------
    def _install_hooks(self, store: Any) -> None:
        def forward(hook: str) -> Callable[..., None]:
            def on_event(*args: Any) -> None:
                with self._events_lock:
                    self._events.append(wire.Event(hook, list(args)))
            return on_event
        if self.engine.adapters is not None:
            self.engine.adapters.manager.set_event_hook(forward("adapter"))
        if store is not None:
            store.set_event_hook(forward("store"))
        if self.engine.constraints is not None:
            self.engine.constraints.set_event_hook(forward("constraint"))

    def _send_events(self) -> None:
        if not self._events:
            return
        with self._events_lock:
            events, self._events = self._events, []
        for event in events:
            self.outbox.send(self.codec.encode(event))

    # ---- the loop -------------------------------------------------------------------------
    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.inbox, zmq.POLLIN)
        wait_ms = 0
        while not self._stopping:
            if poller.poll(0 if self.engine.has_work() and not wait_ms else wait_ms or IDLE_POLL_MS):
                self._receive()
            self._admit_compiled()
            wait_ms = self._step() if self.engine.has_work() else (5 if self._compiling else 0)
            self._send_events()
            if not self.engine.has_work():
                self._send_stats_if_changed()

    def _receive(self) -> None:
        while True:
            try:
                data = self.inbox.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._handle(self.codec.decode(data))

    def _handle(self, message: Any) -> None:
        if isinstance(message, wire.Add):
            self._add(message)
        elif isinstance(message, wire.Abort):
            self._compiling = [entry for entry in self._compiling if entry[0].request.request_id != message.request_id]
            self.engine.abort(message.request_id)
        elif isinstance(message, wire.Command):
            self._command(message)
        elif isinstance(message, wire.Shutdown):
            self._stopping = True

    def _step(self) -> int:
        """One engine step; returns how long to wait for input before the next (ms)."""
        outputs, step_stats = self.engine.step()
        self._send_step(outputs, step_stats)
        return ADAPTER_WAIT_MS if step_stats.batch_size == 0 else 0

    def _send_step(self, outputs: list, step_stats: Any) -> None:
        stats = self.engine.stats()
        self._last_stats = stats
        private = self._private_keys()
        self.outbox.send(self.codec.encode(wire.Step(outputs, stats, step_stats, private)))

    def _send_stats_if_changed(self) -> None:
        stats = self.engine.stats()
        if stats != self._last_stats:
            self._last_stats = stats
            self.outbox.send(self.codec.encode(wire.Step([], stats, None, self._private_keys())))

    def _private_keys(self) -> list[str] | None:
        gateway = self.engine.adapters
        if gateway is None:
            return None
        keys = gateway.private_keys()
        if keys == self._private:
            return None
        self._private = keys
        return sorted(keys)

    # ---- intake -----------------------------------------------------------------------------
    def _add(self, message: wire.Add) -> None:
        constraint = message.request.sampling.constraint
        compiler = self.engine.constraints
        if constraint is None or compiler is None:
            self._admit(message, None)
            return
        # Compiled on the grammar thread; this loop keeps stepping meanwhile.
        deadline = time.monotonic() + compiler.limits.compile_timeout_s
        self._compiling.append((message, compiler.submit(constraint), deadline))

    def _admit_compiled(self) -> None:
        if not self._compiling:
            return
        waiting = []
        for message, future, deadline in self._compiling:
            if future.done():
                error = future.exception()
                if error is None:
                    self._admit(message, future.result())
                else:
                    self._reject(message, RequestRejected("sampling.constraint", str(error)))
            elif time.monotonic() >= deadline:
                future.cancel()
                kind = message.request.sampling.constraint.kind
                limit = self.engine.constraints.limits.compile_timeout_s
                self._reject(message, RequestRejected("sampling.constraint", f"compiling the {kind} took longer "
                                                      f"than {limit:g}s; simplify it"))
            else:
                waiting.append((message, future, deadline))
        self._compiling = waiting

    def _admit(self, message: wire.Add, guide: Any) -> None:
        try:
            # validated by the front end's Intake: the engine does not check it again
            self.engine.add_request(ValidatedRequest(message.request, message.prompt_ids, message.tokenizer_key),
                                    guide=guide)
        except Exception as error:  # noqa: BLE001 - every refusal goes back to its caller
            self._reject(message, error)

    def _reject(self, message: wire.Add, error: BaseException) -> None:
        self.outbox.send(self.codec.encode(wire.Rejected(message.request.request_id, wire.error_to_wire(error))))

    # ---- named commands -----------------------------------------------------------------------
    def _command(self, message: wire.Command) -> None:
        try:
            value = self._commands[message.name](*message.args)
        except Exception as error:  # noqa: BLE001 - handed to the caller
            reply = wire.Reply(message.call_id, error=wire.error_to_wire(error))
        else:
            reply = wire.Reply(message.call_id, value=value)
        self.outbox.send(self.codec.encode(reply))

    def _evict_adapters(self, keys: list[str]) -> None:
        gateway = self.engine.adapters
        if gateway is None or not keys:
            return
        for key in keys:
            gateway.evict(key)
        forget = getattr(self.engine, "forget_adapter_blocks", None)
        if forget is not None:                   # their cached KV blocks can never be hit again
            forget(keys)

    def _warm_adapter(self, key: str) -> bool:
        gateway = self.engine.adapters
        return gateway is not None and gateway.warm(key)

    def _reset_prefix_cache(self) -> bool:
        reset = getattr(self.engine, "reset_prefix_cache", None)
        return False if reset is None else bool(reset())

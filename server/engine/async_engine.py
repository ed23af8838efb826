"""AsyncEngine: the step loop on a background thread, an async iterator per request."""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
from concurrent.futures import Future
from typing import Any, AsyncIterator, Callable

from .builder import build_engine
from .chat_options import ChatOptions
from .engine import LLMEngine, StepStats
from .client import wait_until_empty
from .constraints.spec import ConstraintError
from .io import EngineDraining, EngineInfo, EngineStats, GenerationRequest, RequestOutput, RequestRejected
from .adapter_tokenizers import decode_ids, encode_text, token_texts
from .sequence import FinishReason
from .tokenizer_pool import tokenizer_pool

log = logging.getLogger("loraplex.engine")

# When a step could run nothing because every request waits on an adapter load, the loop
# sleeps this long before the next one: a loop of empty steps would hold the GIL and starve
# the store's loader threads.
ADAPTER_WAIT_S = 0.005

StepListener = Callable[[StepStats], None]


class AsyncEngine:
    """The in-process EngineClient (client.py). Owns one LLMEngine; every call that touches it runs on the engine thread.

    Requests enter through an inbox that the engine thread drains before each step, so the
    scheduler is never touched from two threads. Outputs are handed to each request's
    asyncio queue with `call_soon_threadsafe`.
    """

    def __init__(self, engine: LLMEngine, info: EngineInfo, store: Any = None):
        self.engine = engine
        self.info = info
        self.store = store
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stopping = False
        self._draining = False
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._listeners: list[StepListener] = []
        self._stats = engine.stats()
        self._ids = itertools.count()
        self._tokenizer_pool = tokenizer_pool(engine.config.tokenizer_nice)   # below the engine's priority
        self._thread = threading.Thread(target=self._loop, name="loraplex-engine", daemon=True)
        self._thread.start()

    @classmethod
    async def create(cls, config, store=None, log_fn=print) -> "AsyncEngine":
        """Load the model (off the event loop), warm it up, start the step thread."""
        engine, info = await asyncio.to_thread(build_engine, config, store, log_fn)
        return cls(engine, info, store)

    # ---- public API -----------------------------------------------------------------
    async def generate(self, request: GenerationRequest) -> AsyncIterator[RequestOutput]:
        """Yield deltas for one request; closing the iterator early aborts the request."""
        if self._draining or self._stopping:
            raise EngineDraining("the server is shutting down; retry on another replica")
        intake = self.engine.intake              # validated once, here; the engine does not again
        request = intake.validate(request)
        guide = await self._compile(request)
        loop = asyncio.get_running_loop()
        # Tokenizing (up to max_prompt_bytes of text) must not stall every stream's next token.
        validated = await loop.run_in_executor(self._tokenizer_pool, intake.tokenize, request)
        outputs: asyncio.Queue = asyncio.Queue()
        self._queues[request.request_id] = (loop, outputs)
        try:
            await asyncio.wrap_future(self._call(lambda: self.engine.add_request(validated, guide=guide)))
        except BaseException:
            self._queues.pop(request.request_id, None)
            # Cancelled while add_request was already running: drop the request it may have queued.
            self._call(lambda: self.engine.abort(request.request_id))
            raise
        finished = False
        try:
            while not finished:
                output: RequestOutput = await outputs.get()
                finished = output.finished
                if output.finish_reason is FinishReason.ERROR and output.error is not None:
                    raise output.error
                yield output
        finally:
            self._queues.pop(request.request_id, None)
            if not finished:
                self._call(lambda: self.engine.abort(request.request_id))

    async def _compile(self, request: GenerationRequest) -> Any:
        """The constraint's Guide of a validated request, compiled on the grammar thread (never
        the engine's) within the time limit; None for an unconstrained request."""
        compiler, constraint = self.engine.constraints, request.sampling.constraint
        if constraint is None or compiler is None:
            return None
        try:
            future = compiler.submit(constraint, request.tenant)
            return await asyncio.wait_for(asyncio.wrap_future(future), compiler.limits.compile_timeout_s)
        except ConstraintError as error:
            raise RequestRejected("sampling.constraint", str(error)) from None
        except asyncio.TimeoutError:
            raise RequestRejected("sampling.constraint", f"compiling the {constraint.kind} took longer than "
                                  f"{compiler.limits.compile_timeout_s:g}s; simplify it") from None

    def set_constraint_event_hook(self, hook: Callable[[str, str, float], None] | None) -> None:
        """Report constrained requests and grammar compile times (ConstraintCompiler events)."""
        if self.engine.constraints is not None:
            self.engine.constraints.set_event_hook(hook)

    def new_request_id(self) -> str:
        return f"req-{next(self._ids)}"

    def stats(self) -> EngineStats:
        return self._stats

    def alive(self) -> bool:
        """False once the step thread has stopped (shutdown, or a crash)."""
        return self._thread.is_alive()

    def add_step_listener(self, listener: StepListener) -> None:
        self._listeners.append(listener)

    def set_adapter_event_hook(self, hook: Callable[[str, float], None] | None) -> None:
        """Report the device slots' hits, misses, evictions and load times (AdapterManager
        events; they fire on the engine thread). No-op for a server without adapters."""
        if self.engine.adapters is not None:
            self.engine.adapters.manager.set_event_hook(hook)

    def adapter_is_private(self, key: str) -> bool:
        """Whether a resolved adapter key belongs to a tenant (thread-safe; for metrics labels)."""
        gateway = self.engine.adapters
        return gateway is not None and gateway.is_private(key)

    async def tokenize(self, text: str, add_special_tokens: bool = True, adapter_id: str | None = None,
                       tenant: str | None = None) -> list[int]:
        """EngineClient.tokenize: on the tokenizer thread, never the step loop."""
        tokenizers = self.engine.tokenizers
        return await self._on_tokenizer(lambda: encode_text(tokenizers.for_request(adapter_id, tenant), text,
                                                            add_special_tokens))

    async def detokenize(self, token_ids: list[int], adapter_id: str | None = None,
                         tenant: str | None = None) -> str:
        tokenizers = self.engine.tokenizers
        return await self._on_tokenizer(lambda: decode_ids(tokenizers.for_request(adapter_id, tenant), token_ids))

    def token_text(self, token_id: int) -> str:
        return self.engine.tokenizer.decode([token_id])

    async def token_texts(self, adapter_id: str | None, tenant: str | None) -> Callable[[int], str]:
        tokenizers = self.engine.tokenizers
        return token_texts(await self._on_tokenizer(lambda: tokenizers.for_request(adapter_id, tenant)))

    async def render_chat(self, messages: tuple[tuple[str, str], ...], adapter_id: str | None = None,
                          options: ChatOptions | None = None, tenant: str | None = None) -> list[int]:
        """EngineClient.render_chat (prompt_ids.py: the adapter's template, or the base's, with options)."""
        prompts = self.engine.prompts
        return await self._on_tokenizer(lambda: prompts.of_chat(tuple(messages), adapter_id, options, tenant))

    async def reset_prefix_cache(self) -> bool:
        """EngineClient.reset_prefix_cache (False: this engine keeps no prefix cache)."""
        reset = getattr(self.engine, "reset_prefix_cache", None)
        return False if reset is None else await self._run_on_engine(reset)

    async def _on_tokenizer(self, fn: Callable[[], Any]) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._tokenizer_pool, fn)

    async def _run_on_engine(self, fn: Callable[[], Any]) -> Any:
        """Run fn on the engine thread between steps (e.g. evict a deleted adapter's slot)."""
        return await asyncio.wrap_future(self._call(fn))

    async def evict_adapters(self, keys: list[str]) -> None:
        """Free the device slots (and staged host copies) of deleted adapters, between steps."""
        gateway = self.engine.adapters
        if gateway is not None and keys:
            forget = getattr(self.engine, "forget_adapter_blocks", None)

            def evict() -> None:
                for key in keys:
                    gateway.evict(key)
                if forget is not None:       # their cached KV blocks can never be hit again
                    forget(keys)
            await self._run_on_engine(evict)

    async def warm_adapter(self, key: str) -> bool:
        """Copy a host-loaded adapter into a FREE device slot between steps (never evicts one).

        True when the adapter is resident afterwards. The fleet calls this when Ray routes an
        adapter to this replica for the first time; load it into the host cache first
        (store.load in a worker thread) so the engine thread never reads a blob.
        """
        gateway = self.engine.adapters
        if gateway is None:
            return False
        return await self._run_on_engine(lambda: gateway.warm(key))

    async def drain(self, timeout_s: float | None = None) -> bool:
        """Refuse new requests; wait until in-flight ones finish. True when all finished."""
        self._draining = True
        return await wait_until_empty(self._queues, timeout_s)

    async def shutdown(self) -> None:
        self._draining = self._stopping = True
        self._wake.set()
        await asyncio.to_thread(self._thread.join, 30)
        self._tokenizer_pool.shutdown(wait=False, cancel_futures=True)
        self.engine.chat.sandbox.close()

    # ---- engine thread ----------------------------------------------------------------
    def _call(self, fn: Callable[[], Any]) -> Future:
        future: Future = Future()
        self._inbox.put((fn, future))
        self._wake.set()
        return future

    def _drain_inbox(self) -> None:
        while True:
            try:
                fn, future = self._inbox.get_nowait()
            except queue.Empty:
                return
            if not future.set_running_or_notify_cancel():
                continue                     # the caller gave up (cancel, deadline) before it ran
            try:
                result = fn()
            except BaseException as error:  # noqa: BLE001 - handed to the caller
                future.set_exception(error)
            else:
                future.set_result(result)
                if isinstance(result, RequestOutput):
                    self._dispatch([result])

    def _loop(self) -> None:
        while not self._stopping:
            self._drain_inbox()
            if not self.engine.has_work():
                self._stats = self.engine.stats()
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            try:
                outputs, step_stats = self.engine.step()
            except Exception:  # noqa: BLE001 - the loop must survive; requests were failed
                log.exception("engine step failed")
                continue
            self._stats = self.engine.stats()
            self._dispatch(outputs)
            if step_stats.batch_size == 0:
                # Everything waits on an adapter load: yield the CPU to the loader thread.
                self._wake.wait(ADAPTER_WAIT_S)
                self._wake.clear()
            for listener in self._listeners:
                try:
                    listener(step_stats)
                except Exception:  # noqa: BLE001
                    log.exception("step listener failed")
        self._drain_inbox()

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        for output in outputs:
            target = self._queues.get(output.request_id)
            if target is not None:
                loop, outputs_queue = target
                loop.call_soon_threadsafe(outputs_queue.put_nowait, output)

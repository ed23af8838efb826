"""ProcessEngine: the EngineClient (client.py) whose engine core runs in its own process.

The front end validates and tokenizes a request (intake.py, on its tokenizer thread), sends it
with its token ids over ZeroMQ, and streams the core's per-step outputs (token ids, no text) back
into the request's asyncio queue, detokenized and cut at stop strings on the way (outputs.py).
A receiver thread reads the core's messages and watches its process: when the core dies, in-flight requests fail with EngineUnavailable (UNAVAILABLE; the SDK retries), the
liveness hook reports False (health NOT_SERVING), and a new core is started; serving resumes
when it is ready.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
from typing import Any, AsyncIterator, Callable

import zmq

from . import wire
from ..io import (EngineDraining, EngineInfo, EngineStats, EngineUnavailable, GenerationRequest,
                  RequestOutput, RequestRejected, ValidatedRequest)
from ....adapters_store.errors import StoreError
from ..adapter_tokenizers import AdapterTokenizers, base_tokens, decode_ids, encode_text, token_texts
from ..chat_options import ChatOptions
from ..client import wait_until_empty
from ..chat_template import ChatRenderer
from ..prompt import load_tokenizer
from ..prompt_ids import PromptIds
from ..sequence import FinishReason
from ..tokenizer_pool import tokenizer_pool
from ..intake import Intake
from ..detokenizer import PROMPT_CONTEXT_TOKENS
from .outputs import InFlight, deliver, fail
from .process import CoreExited, CoreProcess
from .supervisor import CoreSupervisor

log = logging.getLogger("loraplex.engine.client")

LivenessHook = Callable[[bool], None]


class ProcessEngine:
    """EngineClient over an engine-core process (see module docstring)."""

    def __init__(self, config: Any, store: Any = None, store_factory: Callable[[], Any] | None = None,
                 log_fn: Callable[[str], None] = print, log_level: str = "INFO"):
        self.config = config
        self.store = store
        self.info: EngineInfo | None = None
        self._store_factory, self._log, self._log_level = store_factory, log_fn, log_level
        self._context = zmq.Context()
        self._encoder = wire.Codec(wire.ToCore)
        self._encode_lock = threading.Lock()
        self._queues: dict[str, InFlight] = {}
        self._calls: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Future]] = {}
        self._ids, self._call_ids = itertools.count(), itertools.count()
        self._listeners: list[Callable[[Any], None]] = []
        self._hooks: dict[str, Callable[..., None] | None] = {"adapter": None, "store": None, "constraint": None}
        self._liveness: LivenessHook | None = None
        self._stats = EngineStats(0, 0, 0, 0, 0, 0, 0, 0, 0)
        self._private: frozenset[str] = frozenset()
        self._serving = self._draining = self._stopping = False
        self._tokenizer = load_tokenizer(config.model_dir)
        self._templates = ChatRenderer(self._tokenizer)   # checks adapters' own chat templates at upload
        if store is not None and hasattr(store, "set_template_check"):
            store.set_template_check(self._templates.check_adapter_template)
        if store is not None and hasattr(store, "set_base_tokens"):   # resized vocabularies are checked
            store.set_base_tokens(base_tokens(self._tokenizer))
        self.tokenizers = AdapterTokenizers(self._tokenizer, None, store)
        # outputs are detokenized on the receiver thread, with tokenizers no other thread uses
        self._output_tokenizers = AdapterTokenizers(load_tokenizer(config.model_dir), None, store)
        self._prompts = PromptIds(self._tokenizer, self._templates, config.limits.max_input_tokens,
                                  self._adapter_template, self.tokenizers)
        self._tokenizer_pool = tokenizer_pool(config.tokenizer_nice)   # below the engine's priority
        self._intake: Intake | None = None
        self._supervisor = CoreSupervisor(self._spawn, self._on_ready, self._on_message, self._on_death)

    @classmethod
    async def create(cls, config: Any, store: Any = None, log_fn: Callable[[str], None] = print,
                     store_factory: Callable[[], Any] | None = None, log_level: str = "INFO") -> "ProcessEngine":
        """Start the engine-core process and wait until its engine is built and warm."""
        client = await asyncio.to_thread(cls, config, store, store_factory, log_fn, log_level)
        try:
            await asyncio.to_thread(client._supervisor.start)
        except BaseException:
            await client.shutdown()
            raise
        return client

    # ---- the core's life (CoreSupervisor calls these on its thread) -------------------------
    def _spawn(self) -> CoreProcess:
        return CoreProcess(self._context, self.config, self._store_factory, self._log_level)

    def _on_ready(self, ready: wire.Ready) -> None:
        if self.info is None:
            from ..builder import base_spec_for

            self.info = wire.info_from_wire(ready.info, base_spec_for(self.config))
            self._intake = Intake(self.config, self._prompts, self.info.vocab_size)
        self._log(f"[loraplex] engine core ready in process {ready.pid}")
        self._serving = True
        self._report_liveness(True)

    def _on_death(self, code: int | None) -> None:
        self._serving = False
        self._report_liveness(False)
        log.error("the engine process exited with code %s; failing %d in-flight requests and restarting it",
                  code, len(self._queues))
        error = EngineUnavailable(f"the engine process exited (code {code}); it is restarting, retry")
        for request_id in list(self._queues):
            fail(self._queues, request_id, error)
        for loop, future in list(self._calls.values()):
            loop.call_soon_threadsafe(_set_exception, future, error)

    def _report_liveness(self, serving: bool) -> None:
        if self._liveness is not None:
            try:
                self._liveness(serving)
            except Exception:  # noqa: BLE001
                log.exception("liveness hook failed")

    # ---- messages from the core -------------------------------------------------------------
    def _on_message(self, message: Any) -> None:
        if isinstance(message, wire.Step):
            self._stats = message.stats
            if message.private_keys is not None:
                self._private = frozenset(message.private_keys)
            for output in message.outputs:
                if deliver(self._queues, output):          # a stop string ended it here
                    self._abort(output.request_id)
            if message.step is not None:
                for listener in self._listeners:
                    _call_quietly(listener, message.step)
        elif isinstance(message, wire.Rejected):
            fail(self._queues, message.request_id, wire.error_from_wire(message.error))
        elif isinstance(message, wire.Reply):
            self._resolve_call(message)
        elif isinstance(message, wire.Event):
            hook = self._hooks.get(message.hook)
            if hook is not None:
                _call_quietly(hook, *message.args)

    def _abort(self, request_id: str) -> None:
        if self._serving:
            try:
                self._send(wire.Abort(request_id))
            except EngineUnavailable:
                pass                # the core is gone: the request went with it

    def _resolve_call(self, reply: wire.Reply) -> None:
        target = self._calls.get(reply.call_id)
        if target is None:
            return
        loop, future = target
        if reply.error is not None:
            loop.call_soon_threadsafe(_set_exception, future, wire.error_from_wire(reply.error))
        else:
            loop.call_soon_threadsafe(_set_result, future, reply.value)

    def _send(self, message: Any) -> None:
        if not self._serving:
            raise EngineUnavailable("the engine process is restarting; retry")
        try:
            self._supervisor.send(self._encode(message))
        except CoreExited:
            raise EngineUnavailable("the engine process is restarting; retry") from None

    def _encode(self, message: Any) -> bytes:
        with self._encode_lock:                  # callers on any thread share one encoder
            return self._encoder.encode(message)

    # ---- requests ---------------------------------------------------------------------------
    async def generate(self, request: GenerationRequest) -> AsyncIterator[RequestOutput]:
        """Yield deltas for one request; closing the iterator early aborts it in the core."""
        if self._draining or self._stopping:
            raise EngineDraining("the server is shutting down; retry on another replica")
        if not self._serving:
            raise EngineUnavailable("the engine process is restarting; retry")
        loop = asyncio.get_running_loop()
        validated, tokenizer = await loop.run_in_executor(self._tokenizer_pool, self._admit, request)
        request = validated.request
        queue: asyncio.Queue = asyncio.Queue()
        request_id = request.request_id
        if request_id in self._queues:
            raise RequestRejected("request_id", f"duplicate request id {request_id!r}")
        self._queues[request_id] = InFlight(loop, queue, tokenizer, validated.prompt_ids[-PROMPT_CONTEXT_TOKENS:],
                                            request.sampling.stop, request.sampling.skip_special_tokens)
        finished = False
        try:
            self._send(wire.Add(validated.request, validated.prompt_ids, validated.tokenizer_key))
            while not finished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                if item.finish_reason is FinishReason.ERROR and item.error is not None:
                    raise item.error
                yield item
        finally:
            self._queues.pop(request_id, None)
            if not finished:
                self._abort(request_id)

    def _admit(self, request: GenerationRequest) -> tuple[ValidatedRequest, Any]:
        """Intake (the request is validated once, here: the core does not check it again) and the
        tokenizer of its output; on the tokenizer thread (an adapter's own tokenizer may load)."""
        validated = self._intake.prepare(request)
        return validated, self._tokenizer_for(validated.request)

    def _tokenizer_for(self, request: GenerationRequest) -> Any:
        """The tokenizer that turns the request's output ids into text on the receiver thread
        (outputs.py): its adapter's own (resized vocabulary) or the base model's; instances that
        no other thread uses."""
        return self._output_tokenizers.for_request(request.adapter_id, request.tenant).tokenizer

    def new_request_id(self) -> str:
        return f"req-{next(self._ids)}"

    # ---- tokenizer: the front end's own, on its tokenizer thread ----------------------------
    async def tokenize(self, text: str, add_special_tokens: bool = True, adapter_id: str | None = None,
                       tenant: str | None = None) -> list[int]:
        tokenizers = self.tokenizers
        return await self._on_tokenizer(lambda: encode_text(tokenizers.for_request(adapter_id, tenant), text,
                                                            add_special_tokens))

    async def detokenize(self, token_ids: list[int], adapter_id: str | None = None,
                         tenant: str | None = None) -> str:
        tokenizers = self.tokenizers
        return await self._on_tokenizer(lambda: decode_ids(tokenizers.for_request(adapter_id, tenant), token_ids))

    def token_text(self, token_id: int) -> str:
        return self._tokenizer.decode([token_id])

    async def token_texts(self, adapter_id: str | None, tenant: str | None) -> Callable[[int], str]:
        tokenizers = self.tokenizers
        return token_texts(await self._on_tokenizer(lambda: tokenizers.for_request(adapter_id, tenant)))

    async def render_chat(self, messages: tuple[tuple[str, str], ...], adapter_id: str | None = None,
                          options: ChatOptions | None = None, tenant: str | None = None) -> list[int]:
        """EngineClient.render_chat, as the in-process engine renders it (prompt_ids.py)."""
        prompts = self._prompts
        return await self._on_tokenizer(lambda: prompts.of_chat(tuple(messages), adapter_id, options, tenant))

    def _adapter_template(self, adapter_id: str | None, tenant: str | None) -> str | None:
        """The chat template an adapter version carries (None: the base model's, or the adapter is
        unknown: the request's adapter check in the core reports that)."""
        if not adapter_id or self.store is None:
            return None
        try:
            return self.store.resolve(adapter_id, tenant).chat_template
        except StoreError:
            return None

    async def _on_tokenizer(self, fn: Callable[[], Any]) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._tokenizer_pool, fn)

    # ---- state ------------------------------------------------------------------------------
    def stats(self) -> EngineStats:
        return self._stats

    def alive(self) -> bool:
        """False while the core is restarting, and after shutdown."""
        return self._serving and not self._stopping

    @property
    def core_pid(self) -> int | None:
        """The engine-core process's id (None between a death and its successor's start)."""
        return self._supervisor.pid if self._serving else None

    def adapter_is_private(self, key: str) -> bool:
        return key in self._private

    # ---- observers --------------------------------------------------------------------------
    def add_step_listener(self, listener: Callable[[Any], None]) -> None:
        self._listeners.append(listener)

    def set_adapter_event_hook(self, hook: Callable[[str, float], None] | None) -> None:
        self._hooks["adapter"] = hook

    def set_constraint_event_hook(self, hook: Callable[[str, str, float], None] | None) -> None:
        self._hooks["constraint"] = hook

    def set_store_event_hook(self, hook: Callable[[str, float], None] | None) -> None:
        """The host-tier events of the core's own store (the front end's store has its own hook)."""
        self._hooks["store"] = hook

    def set_liveness_hook(self, hook: LivenessHook | None) -> None:
        """hook(False) when the core dies, hook(True) when a new one is ready (any thread)."""
        self._liveness = hook

    # ---- admin commands ---------------------------------------------------------------------
    async def evict_adapters(self, keys: list[str]) -> None:
        if keys:
            await self._command("evict_adapters", list(keys))

    async def warm_adapter(self, key: str) -> bool:
        return bool(await self._command("warm_adapter", key))

    async def reset_prefix_cache(self) -> bool:
        return bool(await self._command("reset_prefix_cache"))

    async def _command(self, name: str, *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        call_id = next(self._call_ids)
        self._calls[call_id] = (loop, future)
        try:
            self._send(wire.Command(call_id, name, list(args)))
            return await future
        finally:
            self._calls.pop(call_id, None)

    # ---- lifecycle --------------------------------------------------------------------------
    async def drain(self, timeout_s: float | None = None) -> bool:
        self._draining = True
        return await wait_until_empty(self._queues, timeout_s)

    async def shutdown(self) -> None:
        self._draining = self._stopping = True
        self._serving = False
        await asyncio.to_thread(self._supervisor.stop, self._encode(wire.Shutdown()))
        self._tokenizer_pool.shutdown(wait=False, cancel_futures=True)
        self._templates.sandbox.close()
        self._context.term()


def _call_quietly(fn: Callable[..., None], *args: Any) -> None:
    try:
        fn(*args)
    except Exception:  # noqa: BLE001 - an observer's failure never stops the receiver
        log.exception("engine observer failed")


def _set_result(future: asyncio.Future, value: Any) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future, error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)

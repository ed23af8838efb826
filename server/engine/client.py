"""EngineClient: the one seam between the front ends (gRPC servicers, HTTP routes, the fleet
replica) and the engine core.

Front ends hold an `EngineClient` and nothing else of the engine: no `engine.engine.*`, no
closures run on the engine thread. Two implementations:

- `AsyncEngine` (async_engine.py): the engine in this process, stepped on a background
  thread; used by tests and by `loraplex serve --engine-process off`.
- the engine-core process client (the default for `loraplex serve`): the engine steps on the
  main thread of its own process; requests and outputs cross as plain data.

Every command is named and its arguments are plain data (request dataclasses, ids, strings),
so that both implementations can carry them. Members that only read state (`info`, `stats`,
`alive`, `adapter_is_private`) must be cheap and thread-safe: metrics and health call them.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator, Callable, Protocol, Sized, runtime_checkable

from .chat_options import ChatOptions
from .io import EngineInfo, EngineStats, GenerationRequest, RequestOutput

StepListener = Callable[[object], None]          # receives engine.StepStats after each step
AdapterEventHook = Callable[[str, float], None]
ConstraintEventHook = Callable[[str, str, float], None]


@runtime_checkable
class EngineClient(Protocol):
    """What a front end may ask of the engine core."""

    info: EngineInfo

    # ---- requests ---------------------------------------------------------------------
    def generate(self, request: GenerationRequest) -> AsyncIterator[RequestOutput]:
        """Deltas of one request; closing the iterator early aborts it (KV blocks and the
        adapter lease are freed). Raises EngineError subclasses (io.py) for refusals."""
        ...

    def new_request_id(self) -> str:
        ...

    # ---- tokenizer (never on the engine's step loop) ----------------------------------
    async def tokenize(self, text: str, add_special_tokens: bool = True, adapter_id: str | None = None,
                       tenant: str | None = None) -> list[int]:
        """Token ids of `text` with the tokenizer of `adapter_id`'s requests (as `tenant` sees it: its
        own for a resized vocabulary, else the base model's), off the step loop."""
        ...

    async def detokenize(self, token_ids: list[int], adapter_id: str | None = None,
                         tenant: str | None = None) -> str:
        """Text of `token_ids` with the tokenizer of `adapter_id`'s requests (the base model's when
        None), off the step loop. ValueError naming the range when an id is outside its vocabulary."""
        ...

    def token_text(self, token_id: int) -> str:
        """The text of one base-model token (logprobs' `token` fields); cheap, any thread."""
        ...

    async def token_texts(self, adapter_id: str | None, tenant: str | None) -> Callable[[int], str]:
        """token id -> its text (logprobs' `token` fields) with the tokenizer of `adapter_id`'s
        requests (resolved off the step loop; the function is cheap, any thread)."""
        ...

    async def render_chat(self, messages: tuple[tuple[str, str], ...], adapter_id: str | None = None,
                          options: ChatOptions | None = None, tenant: str | None = None) -> list[int]:
        """Token ids of a chat rendered with the chat template (the adapter's own where it
        has one, as `tenant` sees `adapter_id`), off the step loop. `options`: template options (tools, tool calls in the
        history, chat_template_kwargs, ...: chat_options.py); None = the plain rendering."""
        ...

    # ---- state (cheap, thread-safe) ---------------------------------------------------
    def stats(self) -> EngineStats:
        ...

    def alive(self) -> bool:
        """False once the engine has stopped (shutdown, crash, dead engine process)."""
        ...

    def adapter_is_private(self, key: str) -> bool:
        """Whether a resolved adapter key belongs to a tenant (for metrics labels)."""
        ...

    # ---- observers --------------------------------------------------------------------
    def add_step_listener(self, listener: StepListener) -> None:
        ...

    def set_adapter_event_hook(self, hook: AdapterEventHook | None) -> None:
        ...

    def set_constraint_event_hook(self, hook: ConstraintEventHook | None) -> None:
        ...

    # ---- admin commands (run between steps) -------------------------------------------
    async def evict_adapters(self, keys: list[str]) -> None:
        """Free the device slots (and staged host copies) of deleted adapters."""
        ...

    async def warm_adapter(self, key: str) -> bool:
        """Copy a host-loaded adapter into a free device slot; True when resident after."""
        ...

    async def reset_prefix_cache(self) -> bool:
        """Drop every cached prefix block no running request holds; True when done."""
        ...

    # ---- lifecycle --------------------------------------------------------------------
    async def drain(self, timeout_s: float | None = None) -> bool:
        """Refuse new requests; wait for in-flight ones. True when all finished."""
        ...

    async def shutdown(self) -> None:
        ...


async def wait_until_empty(in_flight: Sized, timeout_s: float | None) -> bool:
    """Drain's wait, for both implementations: True once `in_flight` (the per-request queues)
    is empty, False when timeout_s passes first."""
    loop = asyncio.get_running_loop()
    deadline = None if timeout_s is None else loop.time() + timeout_s
    while len(in_flight):
        if deadline is not None and loop.time() >= deadline:
            return False
        await asyncio.sleep(0.02)
    return True

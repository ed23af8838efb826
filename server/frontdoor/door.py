"""FrontDoor: what every transport (gRPC servicers, HTTP routes, the fleet replica) shares.

It holds the server's live parts through a `Backends` view (the ServiceState: config, keys,
store, engine once loaded, draining) and two small thread pools of its own, so that no
front-end work that scales with a request's size, and no store wait, runs on the event loop
or on asyncio's default executor:

- `parse` (2 threads): decoding and converting request bodies (JSON, pydantic, prompts x n).
- `store` (8 threads): adapter store calls (disk, hashing, registry queries). Deletes never
  hold one while leases drain (admin.py waits on futures instead).
- `listing` (1 thread): listing every adapter (/v1/models, ListAdapters), so a slow listing
  cannot delay single-adapter reads.

The engine is reached only through EngineClient members (server/engine/client.py).
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Protocol, TypeVar

from .errors import Kind, Refusal
from .limits import FrontLimits

T = TypeVar("T")


class Backends(Protocol):
    """The live parts a FrontDoor serves (service/state.py ServiceState)."""

    config: Any
    store: Any
    engine: Any
    draining: bool


class FrontDoor:
    def __init__(self, backends: Backends):
        self.backends = backends
        self.limits = FrontLimits.of(backends.config)
        self._parse = ThreadPoolExecutor(max_workers=2, thread_name_prefix="frontdoor-parse")
        self._store = ThreadPoolExecutor(max_workers=8, thread_name_prefix="frontdoor-store")
        self._listing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="frontdoor-list")

    # ---- live parts ---------------------------------------------------------------------
    def engine(self) -> Any:
        """The EngineClient; UNAVAILABLE while loading or draining."""
        if self.backends.draining:
            raise Refusal(Kind.UNAVAILABLE, "the server is shutting down; retry on another replica")
        if self.backends.engine is None:
            raise Refusal(Kind.UNAVAILABLE, "the model is still loading; retry shortly", retry_after_s=1.0)
        return self.backends.engine

    def store(self) -> Any:
        if self.backends.store is None:
            raise Refusal(Kind.UNAVAILABLE, "the adapter store is not open yet", retry_after_s=1.0)
        return self.backends.store

    def writable_store(self) -> Any:
        if self.backends.draining:
            raise Refusal(Kind.UNAVAILABLE, "the server is shutting down")
        return self.store()

    # ---- off the event loop -------------------------------------------------------------
    async def parse(self, fn: Callable[..., T], *args: Any) -> T:
        """Run request decoding/conversion (work that grows with the body) on the parse pool."""
        return await asyncio.get_running_loop().run_in_executor(self._parse, fn, *args)

    async def on_store(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._store, fn, *args)

    async def on_listing(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._listing, fn, *args)

    def close(self) -> None:
        for pool in (self._parse, self._store, self._listing):
            pool.shutdown(wait=False, cancel_futures=True)

"""Adapter loads on a replica: concurrent, bounded, each with a timeout (issue 37 item 6).

Ray's multiplexed loader holds one lock per replica while it loads, so a blob fetch that hangs
(an unresponsive S3 endpoint) used to stall every other adapter's first request on that
replica. Here the slow part (registry lookup + blob fetch into host memory) runs before Ray's
loader, on a small thread pool of its own, with a deadline; Ray's loader then only claims a
device slot for an adapter already in host memory.
"""

from __future__ import annotations

import asyncio
import functools
from concurrent.futures import ThreadPoolExecutor
from typing import Any

LOAD_WORKERS = 4                 # adapters fetched at once per replica
LOAD_TIMEOUT_S = 20.0            # a request stops waiting for its adapter's fetch after this


class HostLoader:
    """`load(ref, tenant)` -> the adapter's store key, with the adapter in host memory."""

    def __init__(self, store: Any, workers: int = LOAD_WORKERS, timeout_s: float = LOAD_TIMEOUT_S):
        self.store = store
        self.timeout_s = timeout_s
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="loraplex-adapter-load")

    async def load(self, adapter_ref: str, tenant: str | None) -> str:
        """Raises the store's error, or TimeoutError after `timeout_s` (the fetch may go on in its
        thread and land in the host cache for the next request)."""
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._pool, functools.partial(_into_host, self.store, adapter_ref, tenant))
        return await asyncio.wait_for(asyncio.shield(future), self.timeout_s)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _into_host(store: Any, adapter_ref: str, tenant: str | None) -> str:
    key = store.resolve(adapter_ref, tenant).key
    store.load(key)
    return key

"""The grammar thread's queue: bounded, and fair between tenants.

One thread compiles grammars (compiling holds a core for up to the compile time limit).
Before, its queue was a plain FIFO with no bound: 150 valid 54 KiB schemas from one caller
delayed a legitimate structured request 8.6 s (issue 31, defect 9). Now each tenant (the
caller's tenant; "" for callers without one) has its own FIFO, the thread serves the tenants
round-robin, and a submit over `max_per_tenant` queued for that tenant, or `max_total` in all,
is refused at once with QueueFull (429 / RESOURCE_EXHAUSTED with a retry hint).
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from concurrent.futures import Future
from typing import Any, Callable

from ..io import QueueFull


class CompileQueue:
    """Run `work(item)` on one thread, tenants served round-robin; `submit` -> Future."""

    def __init__(self, work: Callable[[Any], Any], max_per_tenant: int, max_total: int,
                 name: str = "loraplex-grammar"):
        self._work = work
        self.max_per_tenant = max_per_tenant
        self.max_total = max_total
        self._queues: OrderedDict[str, deque[tuple[Any, Future]]] = OrderedDict()
        self._num_queued = 0
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def num_queued(self) -> int:
        return self._num_queued

    def submit(self, tenant: str | None, item: Any) -> Future:
        """Queue `item` for `tenant`; QueueFull when that tenant's share or the whole queue is full."""
        key = tenant or ""
        future: Future = Future()
        with self._cond:
            if self._closed:
                raise RuntimeError("the grammar compile queue is closed")
            queue = self._queues.get(key)
            if len(queue or ()) >= self.max_per_tenant:
                raise QueueFull(f"{self.max_per_tenant} grammars of this caller are waiting to compile; retry later")
            if self._num_queued >= self.max_total:
                raise QueueFull(f"{self.max_total} grammars are waiting to compile; retry later")
            if queue is None:
                queue = self._queues[key] = deque()
            queue.append((item, future))
            self._num_queued += 1
            self._cond.notify()
        return future

    def close(self) -> None:
        """Stop the thread; queued work is cancelled."""
        with self._cond:
            self._closed = True
            pending = [future for queue in self._queues.values() for _, future in queue]
            self._queues.clear()
            self._num_queued = 0
            self._cond.notify()
        for future in pending:
            future.cancel()

    def _next(self) -> tuple[Any, Future] | None:
        with self._cond:
            while not self._queues and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            key, queue = next(iter(self._queues.items()))
            item = queue.popleft()
            self._num_queued -= 1
            if queue:
                self._queues.move_to_end(key)            # round-robin: the next tenant goes first
            else:
                del self._queues[key]
            return item

    def _run(self) -> None:
        while (entry := self._next()) is not None:
            item, future = entry
            if not future.set_running_or_notify_cancel():
                continue                                   # the caller gave up while it waited
            try:
                result = self._work(item)
            except BaseException as error:  # noqa: BLE001 - handed to the caller
                future.set_exception(error)
            else:
                future.set_result(result)

"""The engine's view of adapters: resolve ids, prefetch off the step loop, activate slots."""

from __future__ import annotations

import threading
from concurrent.futures import Future
from typing import Any

from ...adapters_store.errors import AdapterNotFound, StoreUnavailable
from ...adapters_store.records import AdapterState
from ..lora.manager import AdapterManager
from .io import AdapterBackendUnavailable, AdapterUnavailable


class AdapterGateway:
    """Joins the adapter store (host tier, disk) and the device slot manager.

    Loading from disk into host memory runs on the store's thread pool (`prefetch`); the
    scheduler only admits a request once its adapter is in host memory, so the step loop
    never waits on disk. Copying host weights into a device slot happens in `activate`.
    """

    def __init__(self, store: Any, manager: AdapterManager):
        self.store = store
        self.manager = manager
        self._lock = threading.Lock()
        self._pending: dict[str, Future] = {}
        self._failed: dict[str, AdapterUnavailable] = {}
        self._staged: dict[str, Any] = {}    # loaded by prefetch, kept until activated
        self._private: set[str] = set()      # resolved keys owned by a tenant
        self._vocab: dict[str, int] = {}     # resolved keys with a resized vocabulary -> its size

    def resolve(self, ref: str, tenant: str | None) -> str:
        """'name' or 'name@3' -> 'name@version', holding a lease until release(key)."""
        record = self.store.resolve(ref, tenant)
        key = record.key
        if record.state is not AdapterState.READY:
            reason = f" ({record.state_reason})" if record.state_reason else ""
            raise AdapterUnavailable(f"adapter {key} is {record.state.value.lower()}{reason}; "
                                     "it cannot be served")
        self.store.acquire(key)
        with self._lock:
            if record.private:
                self._private.add(key)
            else:
                self._private.discard(key)
            if getattr(record, "resized_vocab", False):
                self._vocab[key] = record.vocab_size
        return key

    def vocab_size(self, key: str) -> int:
        """A resolved key's resized vocabulary size (its own tokenizer's ids); 0: the base's."""
        with self._lock:
            return self._vocab.get(key, 0)

    def is_private(self, key: str) -> bool:
        """Whether `key` was private when it was last resolved (metrics never name those)."""
        with self._lock:
            return key in self._private

    def private_keys(self) -> frozenset[str]:
        """Every resolved key that is private now (the engine process sends it to the front end)."""
        with self._lock:
            return frozenset(self._private)

    def release(self, key: str) -> None:
        self.store.release(key)

    def ready(self, key: str) -> bool:
        """True when the adapter is in host memory; otherwise start loading it."""
        if self.manager.slot_of(key) is not None or self.store.is_loaded(key):
            return True
        with self._lock:
            if key in self._staged:
                return True
            if key in self._failed:
                return False
            if key in self._pending:
                return False
            future = self._pending[key] = self.store.prefetch(key)
        # Outside the lock: a future that is already done runs the callback right here.
        future.add_done_callback(lambda f, k=key: self._on_loaded(k, f))
        return False

    def prefetch(self, keys: list[str]) -> None:
        for key in keys:
            self.ready(key)

    def _on_loaded(self, key: str, future: Future) -> None:
        with self._lock:
            self._pending.pop(key, None)
            error = future.exception()
            if error is not None:
                unavailable = isinstance(error, StoreUnavailable)
                self._failed[key] = (AdapterBackendUnavailable if unavailable else AdapterUnavailable)(
                    _safe_message(error))
            else:
                # Held here too, so a host cache too small to keep it cannot stall the request.
                self._staged[key] = future.result()

    def take_failures(self) -> dict[str, AdapterUnavailable]:
        """Adapters whose load failed since the last call (key -> error; AdapterBackendUnavailable when
        the store's backend was unreachable: retrying later may work)."""
        with self._lock:
            failed, self._failed = self._failed, {}
        return failed

    def activate(self, keys: set[str]) -> dict[str, int]:
        return self.manager.activate(keys, self._take_loaded)

    def warm(self, key: str) -> bool:
        """Copy a host-loaded adapter into a FREE device slot (never evicts one); True when it is
        resident afterwards (call between steps)."""
        if self.manager.slot_of(key) is not None:
            return True
        if self.manager.num_loaded >= self.manager.max_loras:
            return False
        self.activate({key})
        return True

    def _take_loaded(self, key: str):
        with self._lock:
            staged = self._staged.pop(key, None)
        return staged if staged is not None else self.store.load(key)

    def evict(self, key: str) -> None:
        """Drop the adapter from the device slot and staging (call between steps)."""
        with self._lock:
            self._staged.pop(key, None)
            self._private.discard(key)
            self._vocab.pop(key, None)
        self.manager.evict(key)


def _safe_message(error: BaseException) -> str:
    if isinstance(error, AdapterNotFound):
        return "adapter was deleted while loading"
    return str(error) or type(error).__name__

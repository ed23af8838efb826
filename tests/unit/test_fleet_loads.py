"""A replica's adapter loads (issue 37 item 6): one hung fetch delays only its own adapter.

The store here is a stand-in whose fetch for one adapter blocks (an unresponsive S3 endpoint);
the HostLoader under test is the real one the replicas use."""

from __future__ import annotations

import asyncio
import threading
import time
from types import SimpleNamespace

from loraplex.server.fleet.loads import HostLoader


class _HangingStore:
    def __init__(self, hung: str):
        self.hung = hung
        self.release = threading.Event()
        self.loaded: list[str] = []

    def resolve(self, ref: str, tenant):
        return SimpleNamespace(key=f"{ref}@1")

    def load(self, key: str) -> None:
        if key.startswith(self.hung):
            self.release.wait(30)               # the fetch that never answers (until the test ends)
        self.loaded.append(key)


def test_a_hung_fetch_delays_only_its_own_adapter():
    store = _HangingStore("stuck")
    loader = HostLoader(store, workers=4, timeout_s=3.0)

    async def scenario():
        hung = asyncio.ensure_future(loader.load("stuck", None))
        await asyncio.sleep(0.05)
        started = time.monotonic()
        keys = await asyncio.gather(*(loader.load(f"warm{i}", None) for i in range(8)))
        others_s = time.monotonic() - started
        try:
            await hung
        except asyncio.TimeoutError:
            timed_out = True
        else:
            timed_out = False
        return keys, others_s, timed_out

    try:
        keys, others_s, timed_out = asyncio.run(scenario())
    finally:
        store.release.set()
        loader.close()
    assert keys == [f"warm{i}@1" for i in range(8)]
    assert others_s < 3.0, others_s                  # not behind the hung fetch (Ray's loader lock was)
    assert timed_out                                  # the hung one's request stops waiting at its deadline

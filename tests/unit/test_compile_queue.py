"""The grammar compile queue (engine/constraints/compile_queue.py, issue 31 defect 9): bounded,
fair between tenants, refusal when full; a cancelled waiter's work is skipped."""

from __future__ import annotations

import threading

import pytest

from loraplex.server.engine.constraints.compile_queue import CompileQueue
from loraplex.server.engine.io import QueueFull


def _queue(max_per_tenant: int = 8, max_total: int = 64):
    gate, ran = threading.Event(), []

    def work(item):
        if item == "first":
            gate.wait(30)
        ran.append(item)
        return item.upper()

    return CompileQueue(work, max_per_tenant, max_total, name="test-grammar"), gate, ran


def test_tenants_are_served_round_robin_not_first_come():
    """One caller's 150 schemas delayed another's structured request 8.6 s: now the other
    caller's grammar compiles right after the one in progress and one of the flood."""
    queue, gate, ran = _queue()
    first = queue.submit("flood", "first")
    flood = [queue.submit("flood", f"f{i}") for i in range(7)]
    legit = queue.submit("acme", "legit")
    gate.set()
    assert legit.result(30) == "LEGIT" and [f.result(30) for f in flood][-1] == "F6"
    assert first.result(30) == "FIRST"
    assert ran.index("legit") <= 2, ran
    queue.close()


def test_a_full_share_or_queue_is_refused_at_once():
    queue, gate, _ = _queue(max_per_tenant=3, max_total=5)
    queue.submit("a", "first")
    _wait(lambda: queue.num_queued == 0)                  # the worker holds "first"
    for i in range(3):
        queue.submit("a", f"a{i}")
    with pytest.raises(QueueFull, match="3 grammars of this caller"):
        queue.submit("a", "a3")
    queue.submit(None, "b0")
    queue.submit("c", "c0")
    with pytest.raises(QueueFull, match="5 grammars are waiting"):
        queue.submit("d", "d0")
    gate.set()
    queue.close()


def test_cancelled_waiters_are_skipped():
    queue, gate, ran = _queue()
    queue.submit("a", "first")
    gone = queue.submit("a", "gone")
    kept = queue.submit("a", "kept")
    assert gone.cancel()
    gate.set()
    assert kept.result(30) == "KEPT" and "gone" not in ran
    queue.close()


def _wait(condition, timeout_s: float = 30.0) -> None:
    import time

    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.005)

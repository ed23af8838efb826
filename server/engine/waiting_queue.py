"""The scheduler's waiting queue: one arrival-ordered FIFO per adapter key."""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Callable, Iterator

from .sequence import Sequence


class WaitingQueues:
    """Waiting sequences: one FIFO per adapter key (None = base model), each in arrival order."""

    def __init__(self, order: Callable[[Sequence], int]):
        self._order = order
        self._queues: dict[str | None, deque[Sequence]] = {}
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def __iter__(self) -> Iterator[Sequence]:
        for queue in self._queues.values():
            yield from queue

    def push(self, seq: Sequence) -> None:
        queue = self._queues.setdefault(seq.adapter_key, deque())
        rank = self._order(seq)
        if not queue or self._order(queue[-1]) < rank:
            queue.append(seq)
        else:   # a preempted sequence goes back to its place in arrival order
            queue.insert(bisect.bisect(queue, rank, key=self._order), seq)
        self._size += 1

    def remove(self, seq: Sequence) -> bool:
        queue = self._queues.get(seq.adapter_key)
        if queue is None or seq not in queue:
            return False
        queue.remove(seq)
        self._drop_if_empty(seq.adapter_key)
        return True

    def head(self, key: str | None) -> Sequence:
        return self._queues[key][0]

    def pop_head(self, key: str | None) -> Sequence:
        seq = self._queues[key].popleft()
        self._drop_if_empty(key)
        return seq

    def has(self, key: str | None) -> bool:
        return key in self._queues

    def heads(self) -> list[tuple[int, str | None]]:
        """(arrival rank of the head, key) per adapter queue; ranks are unique."""
        return [(self._order(queue[0]), key) for key, queue in self._queues.items()]

    def _drop_if_empty(self, key: str | None) -> None:
        self._size -= 1
        if not self._queues[key]:
            del self._queues[key]

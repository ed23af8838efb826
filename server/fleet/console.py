"""Whole lines on the fleet's console.

`loraplex fleet` shares its stdout and stderr (often one pipe) with Ray's log thread, which
forwards every replica's output with `print(line, file=...)`: two writes, the text and then the
newline. The fleet's own messages are printed from the main thread the same way, so a message
could land between another line's text and its newline ("(ServeReplica pid=7) ... loraplex:
fleet serving ..."), and a script or test waiting for the ready line would never see it start a
line. `whole_lines()` swaps sys.stdout and sys.stderr for writers that hold each thread's
partial line and write complete lines only, under one lock shared by both streams.
"""

from __future__ import annotations

import contextlib
import io
import sys
import threading
from typing import Any, Iterator, TextIO


class LineWriter(io.TextIOBase):
    """A text stream that passes `target` whole lines only: a thread's text up to its last
    newline is written in one call under `lock`; the rest waits for that thread's next newline
    (or an explicit flush)."""

    def __init__(self, target: TextIO, lock: threading.Lock):
        super().__init__()
        self._target = target
        self._lock = lock
        self._pending: dict[int, str] = {}      # thread id -> its text after its last newline

    def write(self, text: str) -> int:
        key = threading.get_ident()
        with self._lock:
            buffered = self._pending.pop(key, "") + text
            cut = buffered.rfind("\n") + 1
            if cut:
                self._target.write(buffered[:cut])
                self._target.flush()
            if cut < len(buffered):
                self._pending[key] = buffered[cut:]
        return len(text)

    def flush(self) -> None:
        """Write the calling thread's partial line too (an explicit flush asks for it)."""
        with self._lock:
            self._target.write(self._pending.pop(threading.get_ident(), ""))
            self._target.flush()

    def flush_all(self) -> None:
        """Write every thread's partial line (when the writer is retired)."""
        with self._lock:
            self._target.write("".join(self._pending.values()))
            self._pending.clear()
            self._target.flush()

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._target.fileno()

    def isatty(self) -> bool:
        return self._target.isatty()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self._target, "encoding", "utf-8")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._target, name)


@contextlib.contextmanager
def whole_lines() -> Iterator[None]:
    """sys.stdout and sys.stderr write whole lines only while inside; restored (and each
    thread's partial lines written) after."""
    lock = threading.Lock()
    saved = sys.stdout, sys.stderr
    writers = LineWriter(saved[0], lock), LineWriter(saved[1], lock)
    sys.stdout, sys.stderr = writers
    try:
        yield
    finally:
        sys.stdout, sys.stderr = saved
        for writer in writers:
            writer.flush_all()

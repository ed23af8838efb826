"""Stop strings over a stream of text deltas, holding back text that might start one."""

from __future__ import annotations


class StopChecker:
    """Finds the first stop string to complete in a streamed text; decides what is safe to emit.

    A stop string may span any number of deltas. The stop string and everything after it are
    never emitted; a tail that could still be the start of a stop string is held back until a
    later delta decides it. With no stop strings every delta passes straight through.
    """

    def __init__(self, stop: tuple[str, ...]):
        if any(not isinstance(s, str) or not s for s in stop):
            raise ValueError("stop sequences must be non-empty strings")
        self.stop = tuple(stop)
        self.max_hold = max((len(s) for s in self.stop), default=1) - 1
        self.held = ""
        self.stopped = False

    def feed(self, delta: str) -> tuple[str, bool]:
        """Add new text; return (text safe to emit now, whether a stop string was hit).

        After a hit, further calls return ("", True).
        """
        if self.stopped:
            return "", True
        if not self.stop:
            return delta, False
        text = self.held + delta
        hit = self._first_stop(text)
        if hit is not None:
            self.held, self.stopped = "", True
            return text[:hit], True
        keep = self._partial_tail(text)
        self.held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep], False

    def flush(self) -> str:
        """Release held-back text (the request ends for another reason); "" after a hit."""
        text, self.held = self.held, ""
        return "" if self.stopped else text

    def _first_stop(self, text: str) -> int | None:
        """Start of the stop string that completes first in `text` (ties: the longer), or None.

        Choosing by end position makes the result independent of how text is split into deltas.
        """
        best: tuple[int, int] | None = None          # (end, start)
        for stop in self.stop:
            start = text.find(stop)
            if start >= 0 and (best is None or (start + len(stop), start) < best):
                best = (start + len(stop), start)
        return None if best is None else best[1]

    def _partial_tail(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
        for size in range(min(self.max_hold, len(text)), 0, -1):
            tail = text[len(text) - size:]
            if any(stop.startswith(tail) for stop in self.stop):
                return size
        return 0

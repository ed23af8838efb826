"""TextStream: one request's generated token ids in, its text out, stop strings applied.

The one place where a request's output becomes text, used where detokenization runs: inside
the in-process engine (request_state.RequestState) and, with the engine core in its own process,
in the front end (proc/client.py), which receives token ids only.
"""

from __future__ import annotations

from typing import Any, Sequence

from .detokenizer import IncrementalDetokenizer
from .sequence import FinishReason
from .stop import StopChecker


class TextStream:
    """Incremental detokenizer + stop-string checker for one request.

    `feed` takes the token ids of each output as they come (one engine step's worth at a time:
    where a stop string completes depends on that split) and returns the text safe to emit and
    whether a stop string was hit; the text never includes the stop string, and after a hit
    nothing more is emitted. `finish` returns the held-back tail when the request ends for
    another reason (none after a hit or on ABORT).
    """

    def __init__(self, tokenizer: Any, prompt_token_ids: Sequence[int], stop: tuple[str, ...] = (),
                 skip_special_tokens: bool = True):
        """tokenizer: the one the request's ids belong to (the base model's, or an adapter's own
        for an adapter with a resized vocabulary); prompt_token_ids: its prompt (the last few give
        the first output its spacing context); stop: the request's stop strings."""
        self.detokenizer = IncrementalDetokenizer(tokenizer, list(prompt_token_ids), skip_special_tokens)
        self.stop = StopChecker(tuple(stop))
        self.stopped = False            # a stop string completed: the request ends with STOP

    def feed(self, token_ids: Sequence[int], reason: FinishReason | None = None) -> tuple[str, bool]:
        """(text the new ids complete, whether a stop string has been hit). reason: the request's
        finish reason when these ids end it; EOS or STOP then means its last id ended it (the EOS,
        a stop token id: stop strings are matched here, after the ids came), which is left out of
        the text when special tokens are kept (skipped, ids decode as before: an EOS adds no text)."""
        if reason in (FinishReason.EOS, FinishReason.STOP) and not self.detokenizer.skip_special_tokens:
            token_ids = token_ids[:-1]
        if not token_ids or self.stopped:
            return "", self.stopped
        text, self.stopped = self.stop.feed(self.detokenizer.add(list(token_ids)))
        return text, self.stopped

    def finish(self, reason: FinishReason) -> str:
        """The tail still held back when the request ends with `reason`: characters whose bytes
        were incomplete (as U+FFFD) and text that might have started a stop string. "" after a
        stop-string hit and on ABORT (an aborted request's caller reads nothing more). A stop
        string completed by the tail itself cuts it there (`stopped` becomes True; the
        request's finish reason stays `reason`)."""
        if self.stopped or reason is FinishReason.ABORT:
            return ""
        tail, self.stopped = self.stop.feed(self.detokenizer.flush())
        return tail if self.stopped else tail + self.stop.flush()

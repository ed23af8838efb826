"""The front end's end of one request in engine-process mode: the core sends token ids, this
turns them into the RequestOutputs the caller reads, with their text.

Detokenization and stop strings run here (text_stream.TextStream), on the receiver thread that
reads the core's messages, with a tokenizer only that thread uses (the TextStream is made on
the request's first output), one core output at a time: each output holds one engine step's
tokens, the same split the in-process engine detokenizes, so text, finish reasons and usage are
the same in both modes. On a stop-string hit the output that completed it becomes the request's
last (finish reason STOP; its token ids, generated_tokens and timing are the core's for that
step, as the in-process engine reports them); the caller aborts the request in the core and
drops whatever the core sent after it.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

from ..io import RequestOutput
from ..sequence import FinishReason
from ..text_stream import TextStream


@dataclass(eq=False)
class InFlight:
    """Where one request's outputs go (an asyncio queue on its loop), and how its text is made:
    the tokenizer its ids belong to, the tail of its prompt (spacing context) and its stop strings."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    tokenizer: Any
    prompt_tail: Sequence[int]
    stop: tuple[str, ...]
    skip_special_tokens: bool = True
    done: bool = False          # its last output (or error) went out; later ones are dropped
    text: TextStream | None = field(default=None, repr=False)

    def put(self, item: RequestOutput | BaseException) -> None:
        """Hand an output or an error to the request's loop (any thread)."""
        if isinstance(item, BaseException) or item.finished:
            self.done = True
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    def receive(self, output: RequestOutput) -> RequestOutput | None:
        """The core's output with its text, or None once the request is done. Final when the
        core finished the request or a stop string completed (then finish_reason is STOP)."""
        if self.done:
            return None
        if self.text is None:
            self.text = TextStream(self.tokenizer, self.prompt_tail, self.stop, self.skip_special_tokens)
        text, stopped = self.text.feed(output.token_ids, output.finish_reason)
        if output.finished:
            return replace(output, text=text + self.text.finish(output.finish_reason))
        if stopped:
            return replace(output, text=text, finish_reason=FinishReason.STOP)
        # the core times every output (it cannot know which one a stop string ends); only
        # the last carries timing, as in process
        return replace(output, text=text, timing=None)


def deliver(in_flight: dict[str, InFlight], output: RequestOutput) -> bool:
    """Hand a core output, with its text, to its request (receiver thread). True when a stop
    string ended the request here: the caller aborts it in the core. Outputs of requests that
    already ended are dropped."""
    flight = in_flight.get(output.request_id)
    item = flight.receive(output) if flight is not None else None
    if item is None:
        return False
    flight.put(item)
    return item.finished and not output.finished


def fail(in_flight: dict[str, InFlight], request_id: str, error: BaseException) -> None:
    """End a request that is still waiting with `error` (refused by the core, or the core died)."""
    flight = in_flight.get(request_id)
    if flight is not None and not flight.done:
        flight.put(error)

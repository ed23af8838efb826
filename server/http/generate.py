"""Run the engine requests of one OpenAI request (n choices, several prompts) and answer it.

Each choice's `AsyncEngine.generate` runs in its own task feeding one queue; a watcher puts
DISCONNECTED there when the client goes away. Closing the runner cancels the tasks, which
closes their generators and aborts the engine requests (KV blocks and adapter leases freed),
exactly like a gRPC cancel. Streaming answers are sent only once every choice was admitted and
produced its first output, so admission errors (404, 429, 400) keep their HTTP status.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from ..engine.io import RequestOutput
from .convert import Choice, ParsedRequest
from .errors import to_api_error
from .responses import (ChoiceState, ResponseMeta, TokenText, chat_body, chat_chunk, completion_body,
                        completion_chunk, usage_chunk)

DISCONNECTED = object()
Record = Callable[[str, RequestOutput | None, str | None], None]   # (code, last output, adapter) -> metrics
TokenTimer = Callable[[float, int], None]    # (seconds since the previous delta, tokens) -> metrics


@dataclass(frozen=True)
class Endpoint:
    """What differs between /v1/completions and /v1/chat/completions."""

    method: str            # metrics label
    chunk_object: str
    prompt_param: str      # the parameter engine input errors point at


COMPLETIONS = Endpoint("completions", "text_completion", "prompt")
CHAT = Endpoint("chat.completions", "chat.completion.chunk", "messages")


class ChoiceRunner:
    """The engine requests of one HTTP request, their outputs in one queue."""

    def __init__(self, engine: Any, choices: list[Choice], request: Request, on_tokens: TokenTimer | None = None):
        self.queue: asyncio.Queue = asyncio.Queue()
        self.on_tokens = on_tokens
        self.tasks = [asyncio.create_task(self._pump(engine, choice)) for choice in choices]
        self.watcher = asyncio.create_task(self._watch(request))

    async def _pump(self, engine: Any, choice: Choice) -> None:
        previous = None
        try:
            async with contextlib.aclosing(engine.generate(choice.request)) as outputs:
                async for output in outputs:
                    now = time.monotonic()
                    if self.on_tokens is not None and previous is not None and output.token_ids:
                        self.on_tokens(now - previous, len(output.token_ids))
                    previous = now
                    self.queue.put_nowait((choice.index, output, None))
        except Exception as error:  # noqa: BLE001 - handed to the request's handler
            self.queue.put_nowait((choice.index, None, error))

    async def _watch(self, request: Request) -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                self.queue.put_nowait(DISCONNECTED)
                return

    async def next(self) -> tuple[int, RequestOutput] | None:
        """The next (choice index, output); None when the client disconnected. Raises a choice's error."""
        item = await self.queue.get()
        if item is DISCONNECTED:
            return None
        index, output, error = item
        if error is not None:
            raise error
        return index, output

    async def close(self) -> None:
        """Cancel what still runs (aborting those engine requests) and wait for it."""
        for task in (*self.tasks, self.watcher):
            task.cancel()
        await asyncio.gather(*self.tasks, self.watcher, return_exceptions=True)


def _states(parsed: ParsedRequest) -> dict[int, ChoiceState]:
    n = parsed.body.n or 1
    return {c.index: ChoiceState(c.index, prompt_owner=c.index % n == 0) for c in parsed.choices}


async def respond(engine: Any, parsed: ParsedRequest, request: Request, endpoint: Endpoint,
                  text_of: TokenText, record: Record, on_tokens: TokenTimer | None = None) -> Response:
    """Run every choice and answer with one JSON body or an SSE stream."""
    runner = ChoiceRunner(engine, parsed.choices, request, on_tokens)
    states = _states(parsed)
    meta = ResponseMeta(id=("chatcmpl-" if endpoint is CHAT else "cmpl-") + parsed.choices[0].request.request_id,
                        model=parsed.model)
    try:
        early = await _first_outputs(runner, states) if parsed.stream else None
        if parsed.stream:
            if early is None:
                await runner.close()
                record("499", None, parsed.adapter_id)
                return Response(status_code=499)
            return _sse(_stream(runner, parsed, states, early, meta, endpoint, text_of, record))
        finished = await _run_to_end(runner, states)
    except BaseException as error:
        await runner.close()
        mapped = to_api_error(error, endpoint.prompt_param) if isinstance(error, Exception) else None
        record(str(mapped.status) if mapped else "499", None, parsed.adapter_id)
        if mapped is None:
            raise
        return mapped.response()
    await runner.close()
    if not finished:
        record("499", None, parsed.adapter_id)
        return Response(status_code=499)                 # nobody is listening any more
    for state in states.values():
        record("200", state.last, parsed.adapter_id)
    if endpoint is CHAT:
        return JSONResponse(chat_body(meta, list(states.values()), parsed.logprobs is not None, text_of, parsed.shaper))
    return JSONResponse(completion_body(meta, list(states.values()), parsed.logprobs is not None, text_of))


async def _run_to_end(runner: ChoiceRunner, states: dict[int, ChoiceState]) -> bool:
    """Collect every choice until finished; False when the client disconnected first."""
    while not all(state.finished for state in states.values()):
        item = await runner.next()
        if item is None:
            return False
        states[item[0]].add(item[1])
    return True


async def _first_outputs(runner: ChoiceRunner, states: dict[int, ChoiceState]) -> list | None:
    """Wait until every choice produced an output (admitted and running); those outputs in order."""
    early, started = [], set()
    while len(started) < len(states):
        item = await runner.next()
        if item is None:
            return None
        early.append(item)
        started.add(item[0])
    return early


def _sse(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _event(payload: dict) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


async def _stream(runner: ChoiceRunner, parsed: ParsedRequest, states: dict[int, ChoiceState], early: list,
                  meta: ResponseMeta, endpoint: Endpoint, text_of: TokenText, record: Record) -> AsyncIterator[str]:
    """The SSE events of a streaming request, ending with `data: [DONE]`."""
    want_logprobs = parsed.logprobs is not None
    offsets = {index: 0 for index in states}
    extra = {"usage": None} if parsed.include_usage else {}

    def chunk(index: int, output: RequestOutput) -> dict:
        states[index].add(output)
        if endpoint is CHAT:
            return chat_chunk(meta, index, output, want_logprobs, text_of, parsed.shaper) | extra
        body = completion_chunk(meta, index, output, want_logprobs, text_of, offsets[index]) | extra
        offsets[index] += len(output.text)
        return body

    outcome = "499"                       # until the stream ends one way or another
    try:
        if endpoint is CHAT:
            for index in sorted(states):
                yield _event(chat_chunk(meta, index, None, False, text_of) | extra)
        for index, output in early:
            yield _event(chunk(index, output))
        while not all(state.finished for state in states.values()):
            item = await runner.next()
            if item is None:
                break
            yield _event(chunk(*item))
        else:
            outcome = "200"
            if parsed.include_usage:
                yield _event(usage_chunk(meta, endpoint.chunk_object, list(states.values())))
            yield "data: [DONE]\n\n"
    except Exception as error:  # noqa: BLE001 - the status line is sent: report in the stream
        mapped = to_api_error(error, endpoint.prompt_param)
        outcome = str(mapped.status)
        yield _event(mapped.body())
        yield "data: [DONE]\n\n"
    finally:
        await runner.close()
        if outcome == "200":
            for state in states.values():
                record("200", state.last, parsed.adapter_id)
        else:
            record(outcome, None, parsed.adapter_id)


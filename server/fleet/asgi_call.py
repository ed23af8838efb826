"""Run one forwarded HTTP request through an ASGI app in-process, yielding the response as it
is produced: an `HttpHead`, then body chunks (SSE events arrive one by one, not buffered)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, AsyncIterator

from .wire import HttpCall, HttpHead

_END = object()


def _scope(call: HttpCall) -> dict[str, Any]:
    return {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
            "method": call.method, "scheme": "http", "path": call.path, "raw_path": call.path.encode(),
            "query_string": call.query, "root_path": "",
            "headers": [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in call.headers],
            "client": (call.client or "fleet", 0), "server": ("loraplex-fleet", 0)}


async def run_asgi(app: Any, call: HttpCall, replica: str) -> AsyncIterator[HttpHead | bytes]:
    """The app's response to `call`; closing the iterator (client gone) disconnects the app."""
    queue: asyncio.Queue = asyncio.Queue()
    disconnected = asyncio.Event()
    sent_body = False

    async def receive() -> dict[str, Any]:
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": call.body, "more_body": False}
        await disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        await queue.put(message)

    task = asyncio.create_task(app(_scope(call), receive, send))
    task.add_done_callback(lambda _t: queue.put_nowait(_END))
    started = False
    try:
        while (message := await queue.get()) is not _END:
            if message["type"] == "http.response.start":
                started = True
                headers = tuple((k.decode("latin-1"), v.decode("latin-1")) for k, v in message.get("headers", ()))
                yield HttpHead(message["status"], headers, replica)
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    yield bytes(message["body"])
                if not message.get("more_body", False):
                    break
        if not started:                       # the app failed before answering (it logged why)
            yield HttpHead(500, (("content-type", "application/json"),), replica)
            yield b'{"error": {"message": "internal server error", "type": "internal_error"}}'
    finally:
        disconnected.set()
        if not task.done():
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(task), 5.0)
        if not task.done():
            task.cancel()

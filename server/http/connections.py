"""HTTP connection guards: a cap on open connections, a header read timeout, and one
rate-limited log line instead of a traceback per refused connection.

Without them, half-sent requests were kept forever (issue 31, defect 5): ~20k idle sockets
used every file descriptor, so HTTP, new gRPC connections and uploads failed. Now:

- a connection over `max_connections` is answered at once with 503 and closed;
- a request whose headers are not complete `header_timeout_s` after its first byte (or after
  the connection opened) is answered 408 and closed; the body has its own limit in the app
  (app.py `read_body`);
- each kind of refusal is logged at most once per `LOG_EVERY_S`, with how many happened;
- the unread rest of a body answered early (413) is read and dropped, so that a client that
  sends its whole body before reading still gets the answer, but only up to `max_drain_bytes`:
  past that the connection is closed (uvicorn alone would read a body of any size, or an endless
  chunked one, to keep the connection).
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger("loraplex.http")
LOG_EVERY_S = 10.0


def default_max_connections() -> int:
    """Half the process's file-descriptor limit (the rest stays for gRPC, the store, logs), at most 4096."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(16, min(4096, soft // 2)) if soft > 0 else 4096


class RateLimitedLog:
    """Log one line per kind at most every `every_s`, counting what was not logged."""

    def __init__(self, every_s: float = LOG_EVERY_S):
        self.every_s = every_s
        self._last: dict[str, float] = {}
        self._skipped: dict[str, int] = {}

    def warning(self, kind: str, message: str) -> None:
        now = time.monotonic()
        if now - self._last.get(kind, -self.every_s) < self.every_s:
            self._skipped[kind] = self._skipped.get(kind, 0) + 1
            return
        skipped = self._skipped.pop(kind, 0)
        self._last[kind] = now
        log.warning("%s%s", message, f" ({skipped} more since the last such line)" if skipped else "")


def _response(status: bytes, message: str, kind: str) -> bytes:
    body = ('{"error":{"message":"' + message + '","type":"' + kind + '","param":null,"code":null}}').encode()
    return (b"HTTP/1.1 " + status + b"\r\ncontent-type: application/json\r\nconnection: close\r\nretry-after: 1\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


def guarded_protocol(max_connections: int, header_timeout_s: float, refusals: RateLimitedLog,
                     max_drain_bytes: int = 4 * 2**20) -> type:
    """uvicorn's httptools protocol with the guards above (pass as uvicorn.Config(http=...))."""

    class GuardedHttpProtocol(HttpToolsProtocol):
        def __init__(self, *args: Any, **kwargs: Any):
            super().__init__(*args, **kwargs)
            self._header_timer: asyncio.TimerHandle | None = None
            self._dropped = 0

        def on_body(self, body: bytes) -> None:
            if self.cycle is None or not self.cycle.response_complete:
                super().on_body(body)
                return
            self._dropped += len(body)                 # answered already: uvicorn drops it
            if self._dropped > max_drain_bytes and not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                refusals.warning("connections", f"refusing HTTP connections: {len(self.connections) - 1} open, "
                                                f"the limit is {max_connections} (--http-max-connections)")
                transport.write(_response(b"503 Service Unavailable",
                                          "too many open connections; retry shortly", "service_unavailable"))
                transport.close()
                return
            self._arm()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._dropped = 0
            self._arm()

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self._header_timer is None:
                self._header_timer = self.loop.call_later(header_timeout_s, self._headers_too_slow)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            if self.transport.is_closing() or (self.cycle is not None and not self.cycle.response_complete):
                return                                     # a request is being answered
            refusals.warning("header_timeout", f"closing HTTP connections whose request headers took more than "
                                               f"{header_timeout_s:g}s (--http-header-timeout)")
            self.transport.write(_response(b"408 Request Timeout", "the request headers took too long",
                                           "invalid_request_error"))
            self.transport.close()

    return GuardedHttpProtocol

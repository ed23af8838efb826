"""The fleet's OpenAI HTTP front end: serve's limits, then a forward to a replica.

An ASGI app on --host:--http-port. For each request: the body is read within
--max-message-bytes (413 above it), the API key checked (401 before any replica work), the
fleet's bounded queue applied to generation endpoints (429 + Retry-After), and the request
forwarded to a replica's copy of `loraplex serve`'s HTTP app with the body's `model` (an
adapter id) as Ray's multiplexed model id. The response, SSE included, is streamed through as
the replica produces it, with a `loraplex-replica` header naming the replica. `/health` and
`/ready` are answered here; `/v1/models` by any replica (they share one adapter store).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

from ..http.errors import ApiError, body_too_large, to_api_error, too_large_to_drain
from ..service.auth import KeyRing
from ..service.state import REPLICA_METADATA_KEY
from .admission import Admission, FleetView
from .front_grpc import _remote_error, log_refused
from .wire import HttpCall, HttpHead, routing_id

GENERATION_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})
FORWARDED_PREFIXES = ("/v1/", "/tokenize", "/detokenize")
_HOP_BY_HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "content-length"})


class HttpFront:
    """The ASGI app; one instance per front end."""

    def __init__(self, replicas: Any, admission: Admission, view: FleetView, keys: KeyRing,
                 max_body_bytes: int, base_model_name: str):
        self.replicas, self.admission, self.view, self.keys = replicas, admission, view, keys
        self.max_body_bytes = max_body_bytes
        self.base_model_name = base_model_name

    async def __call__(self, scope: dict, receive, send) -> None:
        if scope["type"] != "http":
            return
        path = scope["path"]
        try:
            if path == "/health":
                return await _json(send, 200, {"status": "ok"})
            if path == "/ready":
                ready = self.view.serving
                return await _json(send, 200 if ready else 503, {"status": "ready" if ready else "no replica"})
            if not path.startswith(FORWARDED_PREFIXES):
                raise ApiError(404, "not found")
            principal = self._authenticate(scope)
            body = await _read_body(scope, receive, self.max_body_bytes)
            rid = routing_id(self._model(body), principal.tenant) if path in GENERATION_PATHS else ""
            call = HttpCall(scope["method"], path, scope.get("query_string", b""), _headers(scope), body,
                            (scope.get("client") or ("", 0))[0])
            if path in GENERATION_PATHS:
                self.admission.enter()
                try:
                    await self._forward(call, rid, send)
                finally:
                    self.admission.leave()
            else:
                await self._forward(call, rid, send)
        except Exception as error:  # noqa: BLE001 - answered in OpenAI's shape
            with contextlib.suppress(Exception):
                mapped = error if isinstance(error, ApiError) else to_api_error(error)
                log_refused(_request_line(scope.get("method", ""), path), str(mapped.status))
                await _json(send, mapped.status, mapped.body(), mapped.headers)

    def _authenticate(self, scope: dict):
        header = dict(_headers(scope)).get("authorization")
        principal = self.keys.authenticate([("authorization", header)] if header is not None else [])
        if principal is None:
            raise ApiError(401, "missing or unknown API key: send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key")
        return principal

    def _model(self, body: bytes) -> str:
        try:
            data = json.loads(body)
        except ValueError:
            return ""
        model = data.get("model") if isinstance(data, dict) else None
        return model if isinstance(model, str) and model != self.base_model_name else ""

    async def _forward(self, call: HttpCall, rid: str, send) -> None:
        handle = self.replicas.options(method_name="http", stream=True, multiplexed_model_id=rid, _by_reference=False)
        parts = handle.remote(call)
        started = ended = False
        try:
            async for part in parts:
                if isinstance(part, HttpHead):
                    if part.status >= 400:
                        log_refused(_request_line(call.method, call.path), str(part.status))
                    headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in part.headers
                               if k.lower() not in _HOP_BY_HOP]
                    headers.append((REPLICA_METADATA_KEY.encode(), part.replica.encode()))
                    await send({"type": "http.response.start", "status": part.status, "headers": headers})
                    started = True
                else:
                    await send({"type": "http.response.body", "body": part, "more_body": True})
            ended = True
        except Exception as error:  # noqa: BLE001 - replica death, Ray failure, or the client went
            if not started:
                raise _remote_error(error) from None
        finally:
            if not ended:               # cancelled, or the client went mid-stream: the replica stops
                parts.cancel()
        if started:
            await send({"type": "http.response.body", "body": b"", "more_body": False})


def _request_line(method: str, path: str) -> str:
    """For the log: the caller chose the path, so it is cut short and quoted (no line breaks)."""
    return f"{method[:8]} {path[:64]!r}"


def _headers(scope: dict) -> tuple[tuple[str, str], ...]:
    return tuple((k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in scope.get("headers", ()))


async def _read_body(scope: dict, receive, limit: int) -> bytes:
    declared = dict(_headers(scope)).get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise body_too_large(f"the request body is {declared} bytes; the limit is {limit} (--max-message-bytes)",
                             too_large_to_drain(int(declared), limit))
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise asyncio.CancelledError()
        body += message.get("body", b"")
        if len(body) > limit:
            raise body_too_large(f"the request body is over the limit of {limit} bytes (--max-message-bytes)")
        if not message.get("more_body", False):
            return bytes(body)


async def _json(send, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
    raw = json.dumps(body).encode()
    pairs = [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]
    pairs += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": pairs})
    await send({"type": "http.response.body", "body": raw, "more_body": False})

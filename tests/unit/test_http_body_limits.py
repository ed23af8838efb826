"""Oversized HTTP bodies (issue 36): refused by Content-Length before any of the body is read,
the connection closed unread when the body declares more than twice the limit; a body a little
over the limit is dropped so that a client that sends it all before reading gets its 413 and keeps
its connection; a chunked body is read up to the limit and its rest dropped only up to twice the
limit. Real uvicorn with the server's guarded protocol (server.py start_asgi) on loopback,
and the app's own read_body."""

from __future__ import annotations

import asyncio
import http.client
import socket
import threading
from dataclasses import replace

import pytest

from loraplex.server.config import ServerConfig
from loraplex.server.http.app import read_body
from loraplex.server.http.errors import ApiError
from loraplex.server.http.server import start_asgi

LIMIT = 64 * 1024


@pytest.fixture(scope="module")
def port():
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    read: list[int] = []

    async def handler(request):
        try:
            body = await read_body(request, LIMIT, 30.0)
        except ApiError as error:
            return error.response()
        read.append(len(body))
        return JSONResponse({"bytes": len(body)})

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    config = replace(ServerConfig(), host="127.0.0.1", max_message_bytes=LIMIT)
    app = Starlette(routes=[Route("/v1/completions", handler, methods=["POST"])])
    server = asyncio.run_coroutine_threadsafe(start_asgi(app, config, 0), loop).result(timeout=60)
    yield server.port
    asyncio.run_coroutine_threadsafe(server.stop(1.0), loop).result(timeout=60)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=30)
    loop.close()


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _read_until_closed(sock: socket.socket) -> bytes:
    reply = b""
    while True:
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            return reply
        if not data:
            return reply
        reply += data


def test_a_body_declared_far_over_the_limit_is_refused_unread_and_closed(port):
    """Headers and 10 bytes of a declared 1 GB body: the 413 comes, then the server closes
    (keeping the connection would have meant reading the whole gigabyte)."""
    sock = _connect(port)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 1000000000\r\n\r\n" + b"{" * 10)
    reply = _read_until_closed(sock)            # returns only because the server closed
    sock.close()
    assert reply.startswith(b"HTTP/1.1 413") and b"connection: close" in reply.lower()
    assert b"1000000000 bytes; the limit is 65536" in reply


def test_a_body_a_little_over_the_limit_gets_its_413_and_keeps_the_connection(port):
    """http.client sends the whole body before it reads: the server drops the rest to answer."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    connection.request("POST", "/v1/completions", body=b" " * (2 * LIMIT))
    response = connection.getresponse()
    assert response.status == 413 and b"the limit is 65536" in response.read()
    connection.request("POST", "/v1/completions", body=b"{}")              # the same connection
    response = connection.getresponse()
    assert response.status == 200 and response.read() == b'{"bytes":2}'
    connection.close()


def test_a_chunked_body_is_read_up_to_the_limit_and_then_cut_off(port):
    """An endless chunked body: 413 once the limit is passed, and the connection is closed after
    at most twice the limit of dropped bytes, so the client's sends fail (uvicorn alone reads on)."""
    sock = _connect(port)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
    chunk = b"4000\r\n" + b" " * 0x4000 + b"\r\n"
    sent = 0
    with pytest.raises(OSError):                 # EPIPE / ECONNRESET once the server has closed
        while sent < 4096 * len(chunk):          # 64 MiB: far past the limit, the drain and the buffers
            sock.sendall(chunk)
            sent += len(chunk)
    reply = _read_until_closed(sock)
    sock.close()
    assert sent < 4096 * len(chunk)
    assert reply == b"" or reply.startswith(b"HTTP/1.1 413")

"""Run the HTTP app on uvicorn inside the server's event loop (no second process or loop)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from dataclasses import dataclass

import uvicorn

from ..config import ServerConfig
from ..service.state import ServiceState
from .app import build_app
from .connections import RateLimitedLog, default_max_connections, guarded_protocol


class _EmbeddedServer(uvicorn.Server):
    """uvicorn without its own signal handling: `loraplex serve` drains on SIGTERM itself."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


@dataclass
class HttpServer:
    """A started HTTP server; `stop()` finishes open responses for up to `grace_s`."""

    server: uvicorn.Server
    task: asyncio.Task
    port: int

    async def stop(self, grace_s: float = 5.0) -> None:
        self.server.config.timeout_graceful_shutdown = max(0.5, grace_s)
        self.server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port} for HTTP: {error.strerror} "
                      "(is the port in use? try --http-port, 0 turns HTTP off)") from None
    sock.listen(2048)
    sock.setblocking(False)
    return sock


async def start_http(config: ServerConfig, state: ServiceState, port: int | None = None) -> HttpServer:
    """Bind `port` (default --http-port) on --host and serve the app; TLS with --tls-cert/--tls-key."""
    return await start_asgi(build_app(state, config), config, config.http_port if port is None else port)


async def start_asgi(app, config: ServerConfig, port: int) -> HttpServer:
    """Serve an ASGI app on --host:`port` the way `loraplex serve` serves its HTTP API (also used
    by the fleet's front end)."""
    sock = _listen(config.host, port)
    protocol = guarded_protocol(config.http_max_connections or default_max_connections(),
                                config.http_header_timeout_s, RateLimitedLog(), 2 * config.max_message_bytes)
    uv_config = uvicorn.Config(app, lifespan="off", access_log=False, log_level="warning", http=protocol,
                               ssl_certfile=config.tls_cert if config.tls_enabled else None,
                               ssl_keyfile=config.tls_key if config.tls_enabled else None,
                               timeout_keep_alive=30)
    server = _EmbeddedServer(uv_config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            task.result()                     # raises what stopped it
            raise OSError("the HTTP server stopped during start-up")
        await asyncio.sleep(0.01)
    return HttpServer(server, task, sock.getsockname()[1])

"""The fleet's front end: a Ray Serve deployment (one replica, on the head node) that binds
--host:--port (gRPC) and --host:--http-port (OpenAI HTTP) itself and forwards to the replicas.

Ray Serve's own proxies are off: they cannot bind an address, bound message sizes, check keys
before routing, answer health per service or shed load (issue 37). This process holds the
same line as `loraplex serve` with serve's own pieces (server options, AuthInterceptor,
grpc.health.v1 servicer, error mapping) and reaches the replicas through a DeploymentHandle.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from ..config import ServerConfig
from ..service.auth import AuthInterceptor, KeyRing
from .admission import Admission, FleetView, running_replicas
from .front_grpc import GrpcForwarder, log_refused
from .front_http import HttpFront
from .ray_setup import keep_serve_grpc_on_loopback

log = logging.getLogger("loraplex.fleet")
WATCH_PERIOD_S = 1.0
UPLOAD_OVERHEAD_BYTES = 1 << 20          # message framing and metadata around the adapter's files


class LoraplexFront:
    """The front end's deployment class; it watches `replica_deployment` of application `app_name`."""

    async def __init__(self, replicas: Any, config: ServerConfig, per_replica: int, app_name: str,
                       replica_deployment: str):
        import grpc

        from ..app import SERVICE_NAMES, _bind, server_options
        from ..http.server import start_asgi

        keep_serve_grpc_on_loopback()
        self.config = config
        self.replicas = replicas
        self.app_name, self.replica_deployment = app_name, replica_deployment
        self.view = FleetView()
        self.health_serving = False          # what gRPC health last said for every service
        self.admission = Admission(self.view, per_replica)
        keys = KeyRing(config.api_keys, config.admin_keys)
        self.health = health_aio.HealthServicer()
        self.services = ("",) + SERVICE_NAMES
        _log_to_stderr(config.log_level)
        self.server = grpc.aio.server(interceptors=[AuthInterceptor(keys, on_refused=log_refused)],
                                      options=server_options(config))
        forwarder = GrpcForwarder(replicas, self.admission, keys, config.max_adapter_bytes + UPLOAD_OVERHEAD_BYTES)
        self.server.add_generic_rpc_handlers(forwarder.handlers())
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(SERVICE_NAMES + (reflection.SERVICE_NAME, health_pb2.DESCRIPTOR
                                                             .services_by_name["Health"].full_name), self.server)
        await self._set_health(False)
        self.port = _bind(self.server, config)
        await self.server.start()
        self.http = None
        if config.http_port:
            app = HttpFront(replicas, self.admission, self.view, keys, config.max_message_bytes,
                            config.base_model_name)
            self.http = await start_asgi(app, config, config.http_port)
        self.watcher = asyncio.create_task(self._watch())
        log.info("loraplex fleet front end on %s:%s (HTTP :%s)", config.host, self.port,
                 self.http.port if self.http else "off")

    async def ports(self) -> tuple[int, int]:
        """(gRPC port, HTTP port or 0) as bound."""
        return self.port, self.http.port if self.http else 0

    async def replicas_running(self) -> int:
        return self.view.running

    async def serving(self) -> bool:
        """True once health answers SERVING (a replica runs and the watcher has said so)."""
        return self.health_serving

    async def routing_view(self) -> dict:
        """What the front end's router sees (tests, diagnostics): {"replicas": replica id ->
        (routing ids in a slot, routing ids in host memory), "state": per-id entries it keeps}."""
        router = _request_router(self.replicas)
        if router is None or not hasattr(router, "view"):
            return {"replicas": {}, "state": 0}
        return {"replicas": router.view(), "state": router.routing_state_size()}

    def check_health(self) -> None:
        if self.watcher.done():
            raise RuntimeError("the front end's replica watcher stopped")

    async def __del__(self) -> None:
        """Shutdown: NOT_SERVING, then the listeners stop (in-flight calls get the grace period)."""
        view = getattr(self, "view", None)
        if view is None:
            return
        view.draining = True
        self.watcher.cancel()
        with contextlib.suppress(Exception):
            await self.health.enter_graceful_shutdown()
        grace = self.config.grace_period_s
        if self.http is not None:
            await self.http.stop(grace_s=grace)
        await self.server.stop(grace=grace)

    async def _watch(self) -> None:
        """Refresh the replica count from Ray Serve's status; health follows it."""
        serving = None
        while True:
            try:
                self.view.running = await asyncio.to_thread(running_replicas, self.app_name, self.replica_deployment)
            except Exception as error:  # noqa: BLE001 - the controller restarting: keep the last view
                log.warning("the fleet's status is unavailable: %s", type(error).__name__)
            if self.view.serving != serving:
                serving = self.view.serving
                await self._set_health(serving)
            await asyncio.sleep(WATCH_PERIOD_S)

    async def _set_health(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in self.services:
            await self.health.set(name, status)
        self.health_serving = serving


def _request_router(handle: Any) -> Any:
    """The request router behind a DeploymentHandle (Ray internals, pinned; None before the
    handle's first call)."""
    router = getattr(getattr(handle, "_router", None), "_asyncio_router", None)
    return getattr(router, "_request_router", None)


def _log_to_stderr(level: str) -> None:
    """The front end's `loraplex` log lines (one per refused call, at INFO) on its stderr, which
    Ray keeps in the worker's log file and shows on the driver (the process has no handler)."""
    logger = logging.getLogger("loraplex")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(level.upper())

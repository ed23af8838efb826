"""The Ray Serve deployment: one loraplex engine per replica behind Ray's gRPC proxy.

Ray's proxy calls the method named like the RPC (`Generate`, `UploadAdapter`, ...) with the
request (or, for client streaming, a stream of requests) and Ray's gRPC context; each method
runs the same servicer `loraplex serve` uses. Generation calls first pass the adapter id to
`warm_adapter`, Ray's multiplexed loader: Ray then reports this replica as holding the
adapter, and its router sends later requests carrying that `multiplexed_model_id` here.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from dataclasses import replace
from typing import Any

from grpc_health.v1 import health_pb2

from ...v1 import adapters_pb2, generation_pb2, server_pb2
from ..config import ServerConfig
from ..metrics import Metrics
from ..service.adapters import AdapterServicer
from ..service.auth import KeyRing
from ..engine.validation import ADAPTER_REF_RE
from ..service.generation import GenerationServicer
from ..service.server_info import ServerServicer
from ..service.state import ServiceState
from .context import FleetAbort, RayServicerContext, authorize
from .metrics import FleetMetrics

log = logging.getLogger("loraplex.fleet")

# Per request: (tenant of the caller, [loaded by this request?]) for the multiplexed loader.
_CALLER: contextvars.ContextVar[tuple[str | None, list[bool]]] = contextvars.ContextVar("loraplex_fleet_caller")

GENERATION = "/loraplex.v1.GenerationService/"
ADAPTERS = "/loraplex.v1.AdapterService/"


class ReplicaBase:
    """One replica. `replica_class` adds the `@serve.multiplexed` loader with its capacity."""

    async def __init__(self, config: ServerConfig):
        from ray import serve

        from ..app import load_engine, wire_engine

        self.name = serve.get_replica_context().replica_id.unique_id
        metrics = Metrics(config.metrics_adapter_labels)
        self.fleet_metrics = FleetMetrics(metrics.registry, self.name)
        self.keys = KeyRing(config.api_keys, config.admin_keys)
        self.state = ServiceState(config=config, keys=self.keys, metrics=metrics, replica=self.name)
        # The replica keeps the in-process engine (issue 36): Ray supervises the replica itself.
        store, engine = await load_engine(replace(config, engine_process=False), log=log.info)
        wire_engine(self.state, store, engine)
        self.generation = GenerationServicer(self.state)
        self.adapters = AdapterServicer(self.state)
        self.server = ServerServicer(self.state)
        self.metrics_http, self.metrics_port = _serve_metrics(metrics, config)
        log.info("loraplex replica %s ready (metrics on :%s)", self.name, self.metrics_port or "off")

    # ---- generation ----------------------------------------------------------------------
    async def Generate(self, request: generation_pb2.GenerateRequest, grpc_context: Any):
        context = RayServicerContext(grpc_context, GENERATION + "Generate")
        try:
            await authorize(self.keys, context)
            await self._route(request.input.adapter_id, context)
            return await self.generation.Generate(request, context)
        except FleetAbort:
            return generation_pb2.GenerateResponse()       # the status travels in Ray's context

    async def GenerateStream(self, request: generation_pb2.GenerateStreamRequest, grpc_context: Any):
        context = RayServicerContext(grpc_context, GENERATION + "GenerateStream")
        await authorize(self.keys, context)                 # FleetAbort: Ray keeps the code we set
        await self._route(request.input.adapter_id, context)
        async for response in self.generation.GenerateStream(request, context):
            yield response

    # ---- adapters (on the shared store) --------------------------------------------------
    async def UploadAdapter(self, request_stream: Any, grpc_context: Any):
        return await self._unary(self.adapters.UploadAdapter, ADAPTERS + "UploadAdapter", request_stream,
                                 grpc_context, adapters_pb2.UploadAdapterResponse())

    async def RegisterAdapter(self, request: adapters_pb2.RegisterAdapterRequest, grpc_context: Any):
        return await self._unary(self.adapters.RegisterAdapter, ADAPTERS + "RegisterAdapter", request,
                                 grpc_context, adapters_pb2.RegisterAdapterResponse())

    async def ListAdapters(self, request: adapters_pb2.ListAdaptersRequest, grpc_context: Any):
        return await self._unary(self.adapters.ListAdapters, ADAPTERS + "ListAdapters", request,
                                 grpc_context, adapters_pb2.ListAdaptersResponse())

    async def GetAdapter(self, request: adapters_pb2.GetAdapterRequest, grpc_context: Any):
        return await self._unary(self.adapters.GetAdapter, ADAPTERS + "GetAdapter", request,
                                 grpc_context, adapters_pb2.GetAdapterResponse())

    async def DeleteAdapter(self, request: adapters_pb2.DeleteAdapterRequest, grpc_context: Any):
        return await self._unary(self.adapters.DeleteAdapter, ADAPTERS + "DeleteAdapter", request,
                                 grpc_context, adapters_pb2.DeleteAdapterResponse())

    # ---- server and health ---------------------------------------------------------------
    async def Info(self, request: server_pb2.InfoRequest, grpc_context: Any):
        return await self._unary(self.server.Info, "/loraplex.v1.ServerService/Info", request, grpc_context,
                                 server_pb2.InfoResponse())

    async def Check(self, request: health_pb2.HealthCheckRequest, grpc_context: Any):
        """grpc.health.v1 Check through the proxy: Ray only routes to replicas that are up."""
        serving = self.state.engine is not None and not self.state.draining
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING if serving
                                              else health_pb2.HealthCheckResponse.NOT_SERVING)

    # ---- Ray Serve hooks -----------------------------------------------------------------
    def check_health(self) -> None:
        """Ray replaces a replica whose engine thread has died."""
        if self.state.engine is None or not self.state.engine.alive():
            raise RuntimeError(f"replica {self.name}: the engine loop is not running")

    async def __del__(self) -> None:
        """Scale-down or shutdown: Ray has stopped routing here and waited for in-flight requests."""
        state = getattr(self, "state", None)
        if state is None:
            return                                          # stopped while still initializing
        state.draining = True
        if state.engine is not None:
            await state.engine.drain(timeout_s=state.config.grace_period_s)
            await state.engine.shutdown()
        if state.store is not None and hasattr(state.store, "close"):
            state.store.close()
        if getattr(self, "metrics_http", None) is not None:
            self.metrics_http.shutdown()

    # ---- plumbing ------------------------------------------------------------------------
    async def _unary(self, handler, method: str, request: Any, grpc_context: Any, empty: Any):
        context = RayServicerContext(grpc_context, method)
        try:
            await authorize(self.keys, context)
            return await handler(request, context)
        except FleetAbort:
            return empty                                    # the status travels in Ray's context

    async def _route(self, adapter_id: str, context: RayServicerContext) -> None:
        """Run Ray's multiplexed loader for the request's adapter and count affinity."""
        if not adapter_id or not ADAPTER_REF_RE.match(adapter_id):
            return                                          # base model, or the servicer rejects it
        tenant = self.keys.principal(context).tenant
        loaded_now = [False]
        token = _CALLER.set((tenant, loaded_now))
        try:
            await self.warm_adapter(adapter_id)
        except Exception as error:  # noqa: BLE001 - the servicer reports not-found etc. properly
            log.debug("warming %s failed: %s", adapter_id, error)
            return                                          # not an adapter this replica can hold
        finally:
            _CALLER.reset(token)
        self.fleet_metrics.request(held=not loaded_now[0])

    async def warm_adapter(self, adapter_id: str) -> str:      # replaced by replica_class
        return await self._load_adapter(adapter_id)

    async def _load_adapter(self, adapter_id: str) -> str:
        """Host cache, then a free device slot; the key ('name@version') is Ray's model object."""
        tenant, loaded_now = _CALLER.get((None, [False]))
        loaded_now[0] = True
        store = self.state.store
        key = await asyncio.to_thread(_load_into_host, store, adapter_id, tenant)
        await self.state.engine.warm_adapter(key)
        self.fleet_metrics.adapter_loaded()
        return key


def _load_into_host(store: Any, adapter_id: str, tenant: str | None) -> str:
    key = store.resolve(adapter_id, tenant).key
    store.load(key)
    return key


def _serve_metrics(metrics: Metrics, config: ServerConfig) -> tuple[Any, int]:
    """This replica's /metrics on --metrics-port, or a free port when another replica on the
    node holds it (0 = off)."""
    if not config.metrics_port:
        return None, 0
    for port in (config.metrics_port, 0):
        try:
            server = metrics.serve(config.host, port)
            return server, server.server_address[1]
        except OSError:
            continue
    return None, 0


def replica_class(max_adapters: int) -> type:
    """The deployment class, with Ray's multiplexed loader holding up to `max_adapters`."""
    from ray import serve

    class LoraplexReplica(ReplicaBase):
        @serve.multiplexed(max_num_models_per_replica=max_adapters)
        async def warm_adapter(self, adapter_id: str) -> str:
            return await self._load_adapter(adapter_id)

    return LoraplexReplica

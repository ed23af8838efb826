"""The Ray Serve deployment: one loraplex engine per replica, behind the fleet's front end.

The front end (front.py) forwards each call as a `ForwardedCall` (gRPC) or `HttpCall` (OpenAI
HTTP) with the adapter's routing id as Ray's `multiplexed_model_id`; the replica runs the same
servicers and FastAPI app `loraplex serve` uses. Generation calls first bring the adapter into
host memory (loads.py: concurrent, bounded, timed out) and then pass its routing id to
`warm_adapter`, Ray's multiplexed loader: Ray then reports this replica as holding the adapter,
and its router sends later requests with that id here.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import time
from dataclasses import replace
from typing import Any, AsyncIterator

from ..config import ServerConfig
from ..metrics import Metrics
from ..service.adapters import AdapterServicer
from ..service.auth import KeyRing
from ..service.generation import GenerationServicer
from ..service.server_info import ServerServicer
from ..service.state import ServiceState
from .asgi_call import run_asgi
from .context import FleetAbort, ForwardContext, authorize
from .loads import HostLoader
from .methods import METHODS, Method, adapter_of
from .metrics import FleetMetrics
from .ray_setup import keep_serve_grpc_on_loopback
from .residency import HOST_STAT, HostIndex
from .wire import CallStatus, ForwardedCall, HttpCall, HttpHead, Reply, routing_id

log = logging.getLogger("loraplex.fleet")

# Per request: the store key of the adapter being warmed, for Ray's multiplexed loader.
_WARMING: contextvars.ContextVar[str] = contextvars.ContextVar("loraplex_fleet_warming")


class HeldAdapter:
    """The object Ray's multiplexed loader keeps per routing id; Ray calls __del__ on eviction."""

    def __init__(self, held: dict[str, "HeldAdapter"], rid: str, key: str):
        self.held, self.rid, self.key = held, rid, key
        held[rid] = self

    def __del__(self) -> None:
        if self.held.get(self.rid) is self:
            del self.held[self.rid]


class ReplicaBase:
    """One replica. `replica_class` adds the `@serve.multiplexed` loader with its capacity."""

    async def __init__(self, config: ServerConfig):
        from ray import serve

        from ..app import load_engine, wire_engine
        from ..http.app import build_app

        keep_serve_grpc_on_loopback()
        self.name = serve.get_replica_context().replica_id.unique_id
        started = time.time()
        metrics = Metrics(config.metrics_adapter_labels)
        self.fleet_metrics = FleetMetrics(metrics.registry, self.name)
        self.keys = KeyRing(config.api_keys, config.admin_keys)
        self.state = ServiceState(config=config, keys=self.keys, metrics=metrics, replica=self.name)
        phases: list[str] = []
        # The replica keeps the in-process engine (issue 36): Ray supervises the replica itself.
        store, engine = await load_engine(replace(config, engine_process=False), log=lambda message: phases.append(
            f"+{time.time() - started:.1f}s {message}"))
        wire_engine(self.state, store, engine)
        self.servicers = {"generation": GenerationServicer(self.state), "adapters": AdapterServicer(self.state),
                          "server": ServerServicer(self.state)}
        self.http_app = build_app(self.state, config)
        self.loader = HostLoader(store)
        self.held: dict[str, HeldAdapter] = {}
        self.host_index = HostIndex()                       # routing id -> store key (bounded)
        self.metrics_http, self.metrics_port = _serve_metrics(metrics, config)
        self.startup = _startup_breakdown(started) + "; " + " | ".join(phases)
        log.warning("loraplex replica %s ready (metrics on :%s): %s", self.name, self.metrics_port or "off",
                    self.startup)

    # ---- what the front end calls --------------------------------------------------------
    async def unary(self, call: ForwardedCall) -> Reply:
        """A unary or client-streaming RPC: the response message and the status."""
        method, context = METHODS[call.method], ForwardContext(call)
        try:
            request = await self._prepare(method, call, context)
            response = await self._handler(method)(request, context)
            return Reply(response.SerializeToString() if response is not None else None, context.status())
        except FleetAbort:
            return Reply(None, context.status())

    async def stream(self, call: ForwardedCall) -> AsyncIterator[Reply]:
        """A server-streaming RPC: each response message, then the status."""
        method, context = METHODS[call.method], ForwardContext(call)
        try:
            request = await self._prepare(method, call, context)
            async with contextlib.aclosing(self._handler(method)(request, context)) as responses:
                async for response in responses:
                    yield Reply(response.SerializeToString())
        except FleetAbort:
            pass
        yield Reply(None, context.status())

    async def http(self, call: HttpCall) -> AsyncIterator[HttpHead | bytes]:
        """An OpenAI HTTP request through the `loraplex serve` app: the head, then body chunks."""
        adapter = _body_model(call)
        if adapter and adapter != self.state.config.base_model_name:
            principal = self.keys.authenticate([(k, v) for k, v in call.headers if k.lower() == "authorization"])
            if principal is not None:
                await self._route(adapter, principal.tenant)
        async with contextlib.aclosing(run_asgi(self.http_app, call, self.name)) as parts:
            async for part in parts:
                yield part

    # ---- Ray Serve hooks -----------------------------------------------------------------
    async def record_routing_stats(self) -> dict[str, Any]:
        """Ray calls this every ROUTING_STATS_PERIOD_S; the fleet's router (routing.py) prefers
        a replica whose `host` list names a request's routing id when no replica holds it in a slot."""
        store = self.state.store
        host_keys = store.host_resident() if store is not None and hasattr(store, "host_resident") else ()
        return {HOST_STAT: self.host_index.host_ids(host_keys, exclude=self.held)}

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
        if getattr(self, "loader", None) is not None:
            self.loader.close()
        if state.store is not None and hasattr(state.store, "close"):
            state.store.close()
        if getattr(self, "metrics_http", None) is not None:
            self.metrics_http.shutdown()
        door = getattr(state, "door", None)
        if door is not None:
            door.close()

    # ---- plumbing ------------------------------------------------------------------------
    def _handler(self, method: Method):
        return getattr(self.servicers[method.servicer], method.name)

    async def _prepare(self, method: Method, call: ForwardedCall, context: ForwardContext) -> Any:
        """Check the key again (defence in depth), parse the request, warm its adapter."""
        await authorize(self.keys, context)
        if method.client_stream:
            return _messages(method.request, call.payload)
        request = method.request.FromString(call.payload)
        adapter = adapter_of(method, request)
        if adapter:
            await self._route(adapter, self.keys.principal(context).tenant)
        return request

    async def _route(self, adapter_ref: str, tenant: str | None) -> None:
        """Bring the adapter into host memory, then register it with Ray's loader (affinity)."""
        rid = routing_id(adapter_ref, tenant)
        if not rid:
            return                                          # the servicer rejects the id
        held = rid in self.held
        if not held:
            try:
                key = await self.loader.load(adapter_ref, tenant)
            except Exception as error:  # noqa: BLE001 - the servicer reports not-found, outages etc.
                log.debug("loading an adapter for routing failed: %s", type(error).__name__)
                return
            self.host_index.note(rid, key)
            token = _WARMING.set(key)
            try:
                await self.warm_adapter(rid)
            except Exception as error:  # noqa: BLE001 - the servicer reports it properly
                log.debug("warming an adapter failed: %s", type(error).__name__)
                return
            finally:
                _WARMING.reset(token)
        else:
            with contextlib.suppress(Exception):
                await self.warm_adapter(rid)                # marks it recently used in Ray's LRU
        self.fleet_metrics.request(held=held)

    async def warm_adapter(self, rid: str) -> HeldAdapter:      # replaced by replica_class
        return await self._load_adapter(rid)

    async def _load_adapter(self, rid: str) -> HeldAdapter:
        """Ray's loader body: a device slot for the adapter already in host memory."""
        held = self.held.get(rid)
        key = held.key if held is not None else _WARMING.get()
        await self.state.engine.warm_adapter(key)
        self.fleet_metrics.adapter_loaded()
        return HeldAdapter(self.held, rid, key)


def _startup_breakdown(init_started: float) -> str:
    """Where this replica's start went: process start + imports, then model load + kernels + warm-up."""
    try:
        import psutil                                   # Ray's own dependency
        before = f"{init_started - psutil.Process().create_time():.1f}s"
    except ImportError:
        before = "?"
    return f"worker process + imports {before}, model load + kernels + warm-up {time.time() - init_started:.1f}s"


async def _messages(cls: type, payloads: tuple[bytes, ...]):
    for payload in payloads:
        yield cls.FromString(payload)       # DecodeError: the servicer maps it as for serve


def _body_model(call: HttpCall) -> str:
    if call.method != "POST" or not call.body:
        return ""
    try:
        data = json.loads(call.body)
    except ValueError:
        return ""
    model = data.get("model") if isinstance(data, dict) else None
    return model if isinstance(model, str) else ""


def _serve_metrics(metrics: Metrics, config: ServerConfig) -> tuple[Any, int]:
    """This replica's /metrics on --metrics-port, or a free port when another replica on the
    node holds it (0 = off)."""
    if not config.metrics_port:
        return None, 0
    for port in (config.metrics_port, 0):
        try:
            server = metrics.serve(config.metrics_host or config.host, port)
            return server, server.server_address[1]
        except OSError:
            continue
    return None, 0


def replica_class(max_adapters: int) -> type:
    """The deployment class, with Ray's multiplexed loader holding up to `max_adapters`."""
    from ray import serve

    class LoraplexReplica(ReplicaBase):
        @serve.multiplexed(max_num_models_per_replica=max_adapters)
        async def warm_adapter(self, rid: str) -> HeldAdapter:
            return await self._load_adapter(rid)

    return LoraplexReplica

"""`loraplex serve`: build the store, engine, gRPC server and metrics endpoint, and run until a signal.

Order: gRPC server up with health NOT_SERVING -> model loaded and warmed -> SERVING and the
ready line. SIGTERM/SIGINT: NOT_SERVING, new requests get UNAVAILABLE, in-flight ones get
`--grace-period` seconds to finish, then the process exits 0.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
from dataclasses import dataclass
from typing import Any, Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from ..v1 import adapters_pb2, adapters_pb2_grpc, generation_pb2, generation_pb2_grpc, server_pb2, server_pb2_grpc
from .config import ServerConfig
from .metrics import Metrics
from .service.adapters import AdapterServicer
from .service.auth import AuthInterceptor, KeyRing
from .service.generation import GenerationServicer
from .service.server_info import ServerServicer
from .service.state import ServiceState

Log = Callable[[str], None]
SERVICE_NAMES = (
    generation_pb2.DESCRIPTOR.services_by_name["GenerationService"].full_name,
    adapters_pb2.DESCRIPTOR.services_by_name["AdapterService"].full_name,
    server_pb2.DESCRIPTOR.services_by_name["ServerService"].full_name,
)


@dataclass
class RunningServer:
    """Handles of a started server (used by `serve` and by tests that run it in-process)."""

    grpc_server: grpc.aio.Server
    health: health_aio.HealthServicer
    state: ServiceState
    port: int
    metrics_port: int = 0
    metrics_http: Any = None
    http: Any = None             # http.server.HttpServer when --http-port is set
    http_port: int = 0


def server_options(config: ServerConfig) -> list[tuple[str, Any]]:
    return [("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
            ("grpc.so_reuseport", 0)]


async def start_grpc(config: ServerConfig, metrics: Metrics | None = None) -> RunningServer:
    """Bind and start the gRPC server (health NOT_SERVING; no engine yet)."""
    keys = KeyRing(config.api_keys, config.admin_keys)
    state = ServiceState(config=config, keys=keys, metrics=metrics)
    server = grpc.aio.server(interceptors=[AuthInterceptor(keys)], options=server_options(config))
    generation_pb2_grpc.add_GenerationServiceServicer_to_server(GenerationServicer(state), server)
    adapters_pb2_grpc.add_AdapterServiceServicer_to_server(AdapterServicer(state), server)
    server_pb2_grpc.add_ServerServiceServicer_to_server(ServerServicer(state), server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(SERVICE_NAMES + (reflection.SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name[
        "Health"].full_name), server)
    for name in ("",) + SERVICE_NAMES:
        await health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    port = _bind(server, config)
    await server.start()
    running = RunningServer(server, health, state, port)
    if metrics is not None and config.metrics_port:
        running.metrics_http = metrics.serve(config.metrics_host or config.host, config.metrics_port)
        running.metrics_port = running.metrics_http.server_address[1]
    return running


def _bind(server: grpc.aio.Server, config: ServerConfig) -> int:
    address = f"{config.host}:{config.port}"
    try:
        if config.tls_enabled:
            with open(config.tls_key, "rb") as key, open(config.tls_cert, "rb") as cert:
                credentials = grpc.ssl_server_credentials([(key.read(), cert.read())])
            port = server.add_secure_port(address, credentials)
        else:
            port = server.add_insecure_port(address)
    except RuntimeError as error:
        raise OSError(f"cannot listen on {address}: {error} (is the port in use? try --port)") from None
    if not port:
        raise OSError(f"cannot listen on {address} (is the port in use? try --port)")
    return port


async def start_http_api(running: RunningServer, config: ServerConfig, port: int | None = None) -> None:
    """Serve the OpenAI-compatible HTTP API on the same ServiceState (engine, store, keys, metrics)."""
    from .http.server import start_http

    running.http = await start_http(config, running.state, port)
    running.http_port = running.http.port


def wire_engine(state: ServiceState, store: Any, engine: Any) -> None:
    """Hand the store and engine to the servicers and feed their events to the metrics."""
    state.store, state.engine = store, engine
    if state.metrics is not None:
        state.metrics.watch_engine(engine.stats, engine.adapter_is_private)
        engine.add_step_listener(state.metrics.on_step)
        from ..adapters_store.cache import metrics_hook
        if store is not None:
            store.set_event_hook(metrics_hook(state.metrics))
        engine.set_adapter_event_hook(metrics_hook(state.metrics, tier="device"))
        if hasattr(engine, "set_store_event_hook"):          # the engine process's own store
            engine.set_store_event_hook(metrics_hook(state.metrics))
        engine.set_constraint_event_hook(state.metrics.constraint_event)
        from .residency_metrics import watch_residency
        watch_residency(state.metrics.registry, engine.stats, store, engine.adapter_is_private)


async def attach_engine(running: RunningServer, store: Any, engine: Any) -> None:
    """Make the services live: wire metrics to the engine and report SERVING.

    An engine-core process that dies turns health NOT_SERVING until its successor is ready."""
    wire_engine(running.state, store, engine)
    if hasattr(engine, "set_liveness_hook"):
        engine.set_liveness_hook(health_follower(running, asyncio.get_running_loop()))
    await set_health(running, True)


async def set_health(running: RunningServer, serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    if running.state.draining:
        return
    for name in ("",) + SERVICE_NAMES:
        await running.health.set(name, status)


def health_follower(running: RunningServer, loop: asyncio.AbstractEventLoop) -> Callable[[bool], None]:
    """A liveness hook (called on any thread) that sets gRPC health on the server's loop."""
    def follow(serving: bool) -> None:
        if not loop.is_closed():
            asyncio.run_coroutine_threadsafe(set_health(running, serving), loop)
    return follow


async def drain_and_stop(running: RunningServer, grace_s: float, log: Log = print) -> bool:
    """NOT_SERVING, refuse new requests, give in-flight ones `grace_s`, stop. True when all finished."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace_s
    state = running.state
    state.draining = True
    await running.health.enter_graceful_shutdown()
    finished = True
    if state.engine is not None:
        log(f"loraplex: draining ({state.engine.stats().num_running} running, up to {grace_s:g}s)")
        finished = await state.engine.drain(timeout_s=grace_s)
    if running.http is not None:
        await running.http.stop(grace_s=max(0.5, deadline - loop.time()))
    await running.grpc_server.stop(grace=max(0.5, deadline - loop.time()))
    if state.engine is not None:
        await state.engine.shutdown()
    close = getattr(state.store, "close", None)
    if close is not None:
        close()
    if running.metrics_http is not None:
        running.metrics_http.shutdown()
    state.door.close()
    return finished


def open_store(config: ServerConfig, engine_config: Any) -> Any:
    """Open (and recover) the adapter store for the served base model."""
    from ..adapters_store.store import AdapterStore, StoreConfig
    from .engine.builder import base_spec_for

    store_config = StoreConfig(
        max_lora_rank=config.max_lora_rank, host_cache_bytes=config.host_cache_bytes,
        quota_bytes=config.adapter_quota_bytes, max_adapter_bytes=config.max_adapter_bytes,
        allowed_register_roots=tuple(config.allowed_register_roots),
        registry_url=config.store_registry, blobs_url=config.store_blobs,
        blob_cache_bytes=config.blob_cache_bytes, adapter_sources=tuple(config.adapter_sources))
    return AdapterStore(config.store_path(), store_config, base=base_spec_for(engine_config))


def ready_line(config: ServerConfig, running: RunningServer, info: Any) -> str:
    metrics = f"metrics on :{running.metrics_port}" if running.metrics_port else "metrics off"
    tls = " (TLS)" if config.tls_enabled else ""
    return (f"loraplex: serving {config.model} ({info.quantization}, {info.dtype}) on "
            f"{config.host}:{running.port}{tls}, {metrics}")


async def serve(config: ServerConfig, log: Log = print) -> int:
    """Run the server until SIGTERM/SIGINT; returns the process exit code."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    metrics = Metrics(config.metrics_adapter_labels)
    running = await start_grpc(config, metrics)
    if config.http_port:
        try:
            await start_http_api(running, config)
        except OSError:
            await drain_and_stop(running, 0, log)
            raise
        scheme = "https" if config.tls_enabled else "http"
        log(f"loraplex: OpenAI-compatible API on {scheme}://{config.host}:{running.http_port}/v1 "
            f"(model '{config.base_model_name}' or an adapter id)")
    log(f"loraplex: loading {config.model} (health NOT_SERVING until ready; gRPC on {config.host}:{running.port})")
    load = asyncio.ensure_future(load_engine(config, log))
    stopper = asyncio.ensure_future(stop.wait())
    await asyncio.wait({load, stopper}, return_when=asyncio.FIRST_COMPLETED)
    if not load.done():
        log("loraplex: stopped while loading the model")
        await drain_and_stop(running, 0, log)
        return 0
    if load.exception() is not None:
        await drain_and_stop(running, 0, log)
        raise load.exception()
    store, engine = load.result()
    await attach_engine(running, store, engine)
    log(ready_line(config, running, engine.info))
    await stopper
    finished = await drain_and_stop(running, config.grace_period_s, log)
    log("loraplex: stopped" + ("" if finished else " (grace period over; unfinished requests were cancelled)"))
    return 0


async def load_engine(config: ServerConfig, log: Log = print) -> tuple[Any, Any]:
    """Resolve the model, open the store, load and warm up the engine: (store, engine)."""
    from .engine.async_engine import AsyncEngine
    from .model.default_model import resolve_model_path

    model_dir = await asyncio.to_thread(resolve_model_path, config.model, log, config.revision)
    engine_config = config.engine_config(model_dir)
    store = await asyncio.to_thread(open_store, config, engine_config)
    if not config.engine_process:
        return store, await AsyncEngine.create(engine_config, store, log_fn=log)
    from .engine.proc.client import ProcessEngine
    try:
        engine = await ProcessEngine.create(engine_config, store, log_fn=log, log_level=config.log_level,
                                            store_factory=functools.partial(open_store, config, engine_config))
    except BaseException:
        store.close()
        raise
    return store, engine


def run(config: ServerConfig) -> int:
    """Entry point of `loraplex serve` after the config is validated."""
    from .host_tuning import tune_malloc

    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    print(f"loraplex: {tune_malloc()}", flush=True)
    return asyncio.run(serve(config, log=lambda message: print(message, flush=True)))

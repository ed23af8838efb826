"""`loraplex fleet`: start (or join) a Ray cluster, start Serve's gRPC proxy, deploy the replicas.

Order: Ray up -> Serve with the gRPC proxy on --port -> the application deployed and every
replica's engine loaded (serve.run waits) -> the ready line. SIGTERM/SIGINT: the application
is deleted (Ray drains each replica for up to --grace-period seconds), then Serve and, for a
local cluster, Ray stop.
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from ..config import ServerConfig
from .config import FleetOptions

Log = Callable[[str], None]
DEPLOYMENT_NAME = "LoraplexReplica"
# Runs in Ray's proxy: adds loraplex.v1 + grpc.health.v1, maps dead replicas to UNAVAILABLE.
SERVICER_FUNCTIONS = ("loraplex.server.fleet.proxy_hooks.add_services_to_server",)


@dataclass(frozen=True)
class RunningFleet:
    """What a started fleet listens on."""

    app_name: str
    port: int                   # Ray Serve's gRPC proxy (loraplex.v1 + grpc.health.v1)
    ray_address: str            # the GCS address, for `ray status` / joining nodes


def deployment_options(config: ServerConfig, options: FleetOptions) -> dict[str, Any]:
    """Ray Serve deployment options: replicas or autoscaling, resources, drain times."""
    found: dict[str, Any] = dict(
        ray_actor_options={"num_cpus": options.replica_cpus, "num_gpus": options.replica_gpus},
        max_ongoing_requests=options.ongoing_requests(config),
        graceful_shutdown_timeout_s=config.grace_period_s,
        graceful_shutdown_wait_loop_s=0.5,
        health_check_period_s=5.0,
        health_check_timeout_s=30.0,
    )
    if options.autoscaling:
        found["autoscaling_config"] = {"min_replicas": options.min_replicas, "max_replicas": options.max_replicas,
                                       "target_ongoing_requests": options.target_ongoing_requests}
    else:
        found["num_replicas"] = options.replicas
    return found


def build_app(config: ServerConfig, options: FleetOptions):
    """The Ray Serve application (bound deployment) for these settings."""
    from ray import serve

    from .replica import replica_class

    cls = replica_class(options.adapters_per_replica(config))
    deployment = serve.deployment(cls, name=DEPLOYMENT_NAME).options(**deployment_options(config, options))
    return deployment.bind(config)


def grpc_port(config: ServerConfig) -> int:
    """--port, or a free port for --port 0 (Ray's proxy needs a number up front)."""
    if config.port:
        return config.port
    with socket.socket() as sock:
        sock.bind((config.host, 0))
        return sock.getsockname()[1]


def start_fleet(config: ServerConfig, options: FleetOptions, log: Log = print) -> RunningFleet:
    """Connect to (or start) Ray, start Serve's proxies, deploy and wait until every replica is up."""
    import ray
    from ray import serve
    from ray.serve.config import HTTPOptions, gRPCOptions

    if not ray.is_initialized():
        ray.init(address=options.ray_address or None, include_dashboard=False,
                 logging_level=logging.WARNING, log_to_driver=True)
    port = grpc_port(config)
    serve.start(grpc_options=gRPCOptions(port=port, grpc_servicer_functions=list(SERVICER_FUNCTIONS)),
                http_options=HTTPOptions(host=config.host, port=_free_port(config.host)))
    log(f"loraplex fleet: deploying {_replicas_text(options)} of {config.model} "
        f"(health NOT_SERVING until ready; gRPC proxy on :{port})")
    serve.run(build_app(config, options), name=options.app_name, route_prefix="/", blocking=False)
    return RunningFleet(options.app_name, port, ray.get_runtime_context().gcs_address)


def stop_fleet(fleet: RunningFleet, options: FleetOptions) -> None:
    """Delete the application (replicas drain); stop Serve and Ray when we started them."""
    import ray
    from ray import serve

    serve.delete(fleet.app_name)
    if not options.ray_address:     # a cluster we joined keeps Serve and its other applications
        serve.shutdown()
        ray.shutdown()


def ready_line(config: ServerConfig, options: FleetOptions, fleet: RunningFleet) -> str:
    metrics = f"replica metrics on :{config.metrics_port}" if config.metrics_port else "replica metrics off"
    return (f"loraplex: fleet serving {config.model} ({config.quantize}) with {_replicas_text(options)} "
            f"on :{fleet.port} (Ray {fleet.ray_address}), {metrics}")


def run(config: ServerConfig, options: FleetOptions, log: Log = lambda message: print(message, flush=True)) -> int:
    """Entry point of `loraplex fleet` after the config is validated (Ray wants the main thread)."""
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stop = threading.Event()
    fleet = start_fleet(config, options, log)
    for sig in (signal.SIGTERM, signal.SIGINT):     # after ray.init, which installs its own
        signal.signal(sig, lambda *_: stop.set())
    try:
        wait_running(options.app_name, stop)
        if not stop.is_set():
            log(ready_line(config, options, fleet))
        while not stop.wait(0.5):
            pass
    finally:
        log("loraplex fleet: stopping (replicas drain)")
        stop_fleet(fleet, options)
    log("loraplex fleet: stopped")
    return 0


def wait_running(app_name: str, stop: threading.Event | None = None, timeout_s: float | None = None) -> None:
    """Until the application is RUNNING (every replica loaded); raise if its deploy failed."""
    from ray import serve
    from ray.serve.schema import ApplicationStatus

    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while stop is None or not stop.is_set():
        status = serve.status().applications.get(app_name)
        if status is not None and status.status == ApplicationStatus.RUNNING:
            return
        if status is not None and status.status == ApplicationStatus.DEPLOY_FAILED:
            raise RuntimeError(f"the fleet failed to deploy: {status.message}")
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"the fleet was not running after {timeout_s:g}s: {status}")
        time.sleep(0.5)


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _replicas_text(options: FleetOptions) -> str:
    if options.autoscaling:
        return f"{options.min_replicas}-{options.max_replicas} replicas (autoscaling)"
    return f"{options.replicas} replica" + ("s" if options.replicas != 1 else "")

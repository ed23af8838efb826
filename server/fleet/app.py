"""`loraplex fleet`: start (or join) a Ray cluster, deploy the front end and the replicas.

Order: Ray up -> Serve (its own proxies off) -> the application deployed: the front end binds
--host:--port (gRPC) and --host:--http-port (HTTP), health NOT_SERVING until a replica runs ->
every replica's engine loaded -> the ready line. SIGTERM/SIGINT: the application
is deleted (Ray drains each replica for up to --grace-period seconds), then Serve and, for a
local cluster, Ray stop.
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
import time
from dataclasses import dataclass, replace
from typing import Any, Callable

from ..config import ServerConfig
from .config import FleetOptions
from .console import whole_lines
from .residency import ROUTING_STATS_PERIOD_S, ROUTING_STATS_TIMEOUT_S

Log = Callable[[str], None]
DEPLOYMENT_NAME = "LoraplexReplica"
FRONT_NAME = "LoraplexFront"


@dataclass(frozen=True)
class RunningFleet:
    """What a started fleet listens on."""

    app_name: str
    port: int                   # the front end's gRPC port (loraplex.v1 + grpc.health.v1)
    ray_address: str            # the GCS address, for `ray status` / joining nodes
    http_port: int = 0          # the front end's OpenAI HTTP port (0: off)
    host: str = "127.0.0.1"


def per_replica_capacity(config: ServerConfig, options: FleetOptions) -> int:
    """Requests one replica accepts: running (--max-num-seqs) + waiting (--max-queued-requests)."""
    return options.ongoing_requests(config) + config.max_queued_requests


def deployment_options(config: ServerConfig, options: FleetOptions) -> dict[str, Any]:
    """Ray Serve deployment options: replicas or autoscaling, resources, drain times."""
    found: dict[str, Any] = dict(
        ray_actor_options={"num_cpus": options.replica_cpus, "num_gpus": options.replica_gpus},
        max_ongoing_requests=per_replica_capacity(config, options),
        graceful_shutdown_timeout_s=config.grace_period_s,
        graceful_shutdown_wait_loop_s=0.5,
        health_check_period_s=HEALTH_CHECK_PERIOD_S,
        health_check_timeout_s=HEALTH_CHECK_TIMEOUT_S,
        request_router_config=router_config(),
    )
    if options.autoscaling:
        found["autoscaling_config"] = {"min_replicas": options.min_replicas, "max_replicas": options.max_replicas,
                                       "target_ongoing_requests": options.target_ongoing_requests}
    else:
        found["num_replicas"] = options.replicas
    return found


def router_config() -> dict[str, Any]:
    """The replicas' request router (routing.py, imported by path where handles route: Ray is
    not imported here): slot holder, then host-memory holder, then any replica."""
    return {"request_router_class": "loraplex.server.fleet.routing.ResidencyRouter",
            "request_routing_stats_period_s": ROUTING_STATS_PERIOD_S,
            "request_routing_stats_timeout_s": ROUTING_STATS_TIMEOUT_S}


# Ray's health check of a replica (check_health: is the engine loop alive?). A SIGKILLed replica
# is noticed by Ray at once (its actor dies); these only bound how long a hung one serves.
HEALTH_CHECK_PERIOD_S = 2.0
HEALTH_CHECK_TIMEOUT_S = 10.0


def front_options(config: ServerConfig) -> dict[str, Any]:
    """The front end: one replica on the head node (the address clients and Services reach),
    no CPU reserved (it forwards; the replicas compute)."""
    return dict(num_replicas=1, max_ongoing_requests=16, graceful_shutdown_timeout_s=config.grace_period_s,
                ray_actor_options={"num_cpus": 0, "resources": {"node:__internal_head__": 0.001}},
                health_check_period_s=HEALTH_CHECK_PERIOD_S, health_check_timeout_s=HEALTH_CHECK_TIMEOUT_S)


def build_app(config: ServerConfig, options: FleetOptions):
    """The Ray Serve application: the front end (ingress) bound to the replica deployment."""
    from ray import serve

    from .front import LoraplexFront
    from .replica import replica_class

    cls = replica_class(options.adapters_per_replica(config))
    replicas = serve.deployment(cls, name=DEPLOYMENT_NAME).options(**deployment_options(config, options))
    front = serve.deployment(LoraplexFront, name=FRONT_NAME).options(**front_options(config))
    return front.bind(replicas.bind(config), config, per_replica_capacity(config, options), options.app_name,
                      DEPLOYMENT_NAME)


def grpc_port(config: ServerConfig) -> int:
    """--port, or a free port for --port 0 (fixed before deploying, so a restarted front end
    binds the same one)."""
    if config.port:
        return config.port
    with socket.socket() as sock:
        sock.bind((config.host, 0))
        return sock.getsockname()[1]


def start_fleet(config: ServerConfig, options: FleetOptions, log: Log = print) -> RunningFleet:
    """Connect to (or start) Ray, deploy the front end and the replicas (Ray Serve's own proxies
    stay off: the front end listens)."""
    import ray
    from ray import serve

    from .ray_setup import init_ray

    init_ray(config, options)
    config = replace(config, port=grpc_port(config))
    serve.start(proxy_location="Disabled")
    log(f"loraplex fleet: deploying {_replicas_text(options)} of {config.model} "
        f"(health NOT_SERVING until ready; gRPC on {config.host}:{config.port})")
    serve.run(build_app(config, options), name=options.app_name, route_prefix=None, blocking=False)
    front = serve.get_app_handle(options.app_name)
    port, http_port = front.ports.remote().result(timeout_s=600)
    _wait_serving(front, log)
    return RunningFleet(options.app_name, port, ray.get_runtime_context().gcs_address, http_port, config.host)


def _wait_serving(front: Any, log: Log, timeout_s: float = 900.0) -> None:
    """Return once the front end's health says SERVING (a replica has loaded, warmed up and is
    running), so that the ready line is only printed when requests can be served."""
    deadline = time.monotonic() + timeout_s
    next_note = time.monotonic() + 30
    while not front.serving.remote().result(timeout_s=60):
        if time.monotonic() > deadline:
            raise RuntimeError(f"no replica was serving {timeout_s:g}s after the deployment; see the Ray logs")
        if time.monotonic() > next_note:
            log("loraplex fleet: waiting for a replica to finish loading the model")
            next_note = time.monotonic() + 30
        time.sleep(0.25)


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
    http = f"OpenAI HTTP on {fleet.host}:{fleet.http_port}" if fleet.http_port else "HTTP off"
    return (f"loraplex: fleet serving {config.model} ({config.quantize}) with {_replicas_text(options)} "
            f"on {fleet.host}:{fleet.port} (Ray {fleet.ray_address}), {http}, {metrics}")


def run(config: ServerConfig, options: FleetOptions, log: Log = lambda message: print(message, flush=True)) -> int:
    """Entry point of `loraplex fleet` after the config is validated (Ray wants the main thread).
    The console gets whole lines only (console.py): Ray's log thread shares it."""
    with whole_lines():
        return _run(config, options, log)


def _run(config: ServerConfig, options: FleetOptions, log: Log) -> int:
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


def _replicas_text(options: FleetOptions) -> str:
    if options.autoscaling:
        return f"{options.min_replicas}-{options.max_replicas} replicas (autoscaling)"
    return f"{options.replicas} replica" + ("s" if options.replicas != 1 else "")

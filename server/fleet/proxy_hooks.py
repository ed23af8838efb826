"""Runs inside Ray Serve's gRPC proxy: registers the loraplex.v1 services, maps dead replicas.

Ray's proxy imports the functions named in `gRPCOptions.grpc_servicer_functions` and calls
each with a placeholder servicer and its server, so `add_services_to_server` is the one place
loraplex code runs in the proxy process. Besides adding the services (and grpc.health.v1), it
makes the proxy answer UNAVAILABLE instead of INTERNAL when the replica handling a call dies
(Ray's default shows INTERNAL with the actor's pid and address): the SDK retries UNAVAILABLE,
and Ray's router sends the retry to a live replica.
"""

from __future__ import annotations

import logging

import grpc

log = logging.getLogger("loraplex.fleet")
REPLICA_DIED_MESSAGE = "the replica serving this request stopped before finishing it; retry (Ray routes the retry to a live replica)"


def add_services_to_server(servicer, server) -> None:
    """A `grpc_servicer_functions` entry: every loraplex.v1 service plus grpc.health.v1."""
    from grpc_health.v1 import health_pb2_grpc

    from ...v1 import adapters_pb2_grpc, generation_pb2_grpc, server_pb2_grpc

    generation_pb2_grpc.add_GenerationServiceServicer_to_server(servicer, server)
    adapters_pb2_grpc.add_AdapterServiceServicer_to_server(servicer, server)
    server_pb2_grpc.add_ServerServiceServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    install_replica_death_mapping()


def install_replica_death_mapping() -> bool:
    """Wrap the proxy's exception -> gRPC status function (idempotent). False if Ray changed."""
    try:
        from ray.exceptions import RayActorError
        from ray.serve._private import proxy
        from ray.serve._private.proxy_request_response import ResponseStatus
    except ImportError:
        return False
    original = getattr(proxy, "get_grpc_response_status", None)
    if original is None:
        log.warning("loraplex: this Ray version's proxy has no get_grpc_response_status; a dead replica's "
                    "calls will fail INTERNAL instead of UNAVAILABLE")
        return False
    if getattr(original, "_loraplex", False):
        return True

    def response_status(exc, request_timeout_s, request_id):
        if isinstance(exc, RayActorError):
            return ResponseStatus(code=grpc.StatusCode.UNAVAILABLE, is_error=True, message=REPLICA_DIED_MESSAGE)
        return original(exc, request_timeout_s, request_id)

    response_status._loraplex = True
    proxy.get_grpc_response_status = response_status
    return True

"""A grpc.aio.ServicerContext look-alike over Ray Serve's per-request gRPC context.

The `loraplex serve` servicers run unchanged inside a replica: they read metadata, set
trailers and abort through this class. `abort` records code, message and trailers on Ray's
context (Ray copies them onto the proxy's real call) and raises `FleetAbort`, which the
servicers' error decorator lets through like grpc's own AbortError.
"""

from __future__ import annotations

from typing import Any, Sequence

import grpc

from ..service.auth import ADMIN_METHODS, OPEN_PREFIXES, KeyRing, Role

Metadata = Sequence[tuple[str, Any]]


class FleetAbort(grpc.aio.AbortError):
    """The RPC was ended with a status already recorded on the Ray context."""


class RayServicerContext:
    """The subset of grpc.aio.ServicerContext the loraplex servicers use."""

    def __init__(self, ray_context: Any, method: str):
        self.ray_context = ray_context          # ray.serve.grpc_util.RayServegRPCContext
        self.method = method                    # "/loraplex.v1.GenerationService/Generate"
        self._trailers: tuple[tuple[str, Any], ...] = ()

    def invocation_metadata(self) -> Metadata:
        return tuple(self.ray_context.invocation_metadata())

    def peer(self) -> str:
        return self.ray_context.peer()

    def time_remaining(self) -> float | None:
        return None                             # the proxy holds the deadline and cancels us

    def trailing_metadata(self) -> Metadata:
        return self._trailers

    def set_trailing_metadata(self, trailing_metadata: Metadata) -> None:
        self._trailers = tuple(trailing_metadata)
        self.ray_context.set_trailing_metadata(list(self._trailers))

    def set_code(self, code: grpc.StatusCode) -> None:
        self.ray_context.set_code(code)

    def set_details(self, details: str) -> None:
        self.ray_context.set_details(details)

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata: Metadata = ()) -> None:
        self.ray_context.set_code(code)
        self.ray_context.set_details(details)
        if trailing_metadata:
            self.set_trailing_metadata(trailing_metadata)
        raise FleetAbort()


async def authorize(keys: KeyRing, context: RayServicerContext) -> None:
    """What AuthInterceptor does for `loraplex serve`: UNAUTHENTICATED / PERMISSION_DENIED."""
    if not keys.enabled or context.method.startswith(OPEN_PREFIXES):
        return
    principal = keys.authenticate(context.invocation_metadata())
    if principal is None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                            "missing or unknown API key: send metadata 'authorization: Bearer <key>'")
    if context.method in ADMIN_METHODS and principal.role is not Role.ADMIN:
        await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                            f"{context.method.rsplit('/', 1)[-1]} needs an admin key")

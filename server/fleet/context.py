"""A grpc.aio.ServicerContext look-alike for a call the front end forwarded to a replica.

The `loraplex serve` servicers run unchanged inside a replica: they read metadata, set
trailers and abort through this class. It records code, details and trailers (the replica
returns them as a `CallStatus`, the front end puts them on the client's call); `abort` raises
`FleetAbort`, which the servicers' error decorator lets through like grpc's own AbortError.
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import grpc

from ..service.auth import ADMIN_METHODS, OPEN_PREFIXES, KeyRing, Role
from .wire import CallStatus, ForwardedCall

Metadata = Sequence[tuple[str, Any]]


class FleetAbort(grpc.aio.AbortError):
    """The RPC was ended with a status already recorded on the context."""


class ForwardContext:
    """The subset of grpc.aio.ServicerContext the loraplex servicers use."""

    def __init__(self, call: ForwardedCall):
        self.call = call
        self.method = call.method
        self._deadline = None if call.deadline_unix is None else \
            time.monotonic() + (call.deadline_unix - time.time())
        self._trailers: tuple[tuple[str, Any], ...] = ()
        self._code = grpc.StatusCode.OK
        self._details = ""

    def invocation_metadata(self) -> Metadata:
        return self.call.metadata

    def peer(self) -> str:
        return self.call.peer

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else self._deadline - time.monotonic()

    def trailing_metadata(self) -> Metadata:
        return self._trailers

    def set_trailing_metadata(self, trailing_metadata: Metadata) -> None:
        self._trailers = tuple(trailing_metadata)

    def set_code(self, code: grpc.StatusCode) -> None:
        self._code = code

    def set_details(self, details: str) -> None:
        self._details = details

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata: Metadata = ()) -> None:
        self._code, self._details = code, details
        if trailing_metadata:
            self.set_trailing_metadata(trailing_metadata)
        raise FleetAbort()

    def status(self) -> CallStatus:
        return CallStatus(self._code.name, self._details, self._trailers)


async def authorize(keys: KeyRing, context: ForwardContext) -> None:
    """What AuthInterceptor does for `loraplex serve` (the front end has checked it too)."""
    if not keys.enabled or context.method.startswith(OPEN_PREFIXES):
        return
    principal = keys.authenticate(context.invocation_metadata())
    if principal is None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                            "missing or unknown API key: send metadata 'authorization: Bearer <key>'")
    if context.method in ADMIN_METHODS and principal.role is not Role.ADMIN:
        await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                            f"{context.method.rsplit('/', 1)[-1]} needs an admin key")

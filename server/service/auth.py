"""API-key auth: `authorization: Bearer <key>` metadata, two roles, constant-time comparison.

Inference keys may generate and read adapters; admin keys may also upload, register and
delete. Health checks and server reflection stay open. Keys are never logged.
"""

from __future__ import annotations

import hmac
from typing import Callable, Iterable, Sequence

import grpc

from ..config import ApiKey
from ..frontdoor.access import ANONYMOUS_ADMIN, Operation, Principal, Role, authorize
from ..frontdoor.errors import Refusal

__all__ = ["ADMIN_METHODS", "ANONYMOUS_ADMIN", "AuthInterceptor", "KeyRing", "Principal", "Role"]

# The gRPC methods that are front-door admin operations (the rest are inference operations).
METHOD_OPERATIONS = {
    "/loraplex.v1.AdapterService/UploadAdapter": Operation.UPLOAD,
    "/loraplex.v1.AdapterService/RegisterAdapter": Operation.REGISTER,
    "/loraplex.v1.AdapterService/DeleteAdapter": Operation.DELETE,
    "/loraplex.v1.ServerService/ResetPrefixCache": Operation.RESET_CACHE,
}
ADMIN_METHODS = frozenset(method for method, operation in METHOD_OPERATIONS.items() if operation.admin)
OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


class KeyRing:
    """The configured keys; `authenticate` compares against every key in constant time."""

    def __init__(self, api_keys: Sequence[ApiKey], admin_keys: Sequence[ApiKey]):
        self._entries = [(key.secret.encode(), Principal(Role.INFERENCE, key.tenant)) for key in api_keys]
        self._entries += [(key.secret.encode(), Principal(Role.ADMIN, key.tenant)) for key in admin_keys]

    @property
    def enabled(self) -> bool:
        return bool(self._entries)

    def __repr__(self) -> str:
        return f"KeyRing({len(self._entries)} keys)"

    def authenticate(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> Principal | None:
        """The principal of the bearer key in `metadata`, or None when missing or unknown."""
        if not self.enabled:
            return ANONYMOUS_ADMIN
        presented = _bearer_token(metadata)
        if presented is None:
            return None
        found = None
        for secret, principal in self._entries:       # no early exit: time does not depend on the match
            if hmac.compare_digest(secret, presented):
                found = principal
        return found

    def principal(self, context: grpc.aio.ServicerContext) -> Principal:
        """The caller of an RPC that already passed the interceptor."""
        return self.authenticate(context.invocation_metadata()) or ANONYMOUS_ADMIN


def _bearer_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> bytes | None:
    for key, value in metadata or ():
        if key.lower() != "authorization":
            continue
        text = value.decode() if isinstance(value, bytes) else value
        scheme, _, token = text.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip().encode()
    return None


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Reject calls without a valid key (UNAUTHENTICATED) or with too small a role (PERMISSION_DENIED)."""

    def __init__(self, keys: KeyRing, on_refused: Callable[[str, grpc.StatusCode], None] | None = None):
        self.keys = keys
        self.on_refused = on_refused            # (method, code) per refused call (the fleet's log line)

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if not self.keys.enabled or method.startswith(OPEN_PREFIXES):
            return await continuation(handler_call_details)
        principal = self.keys.authenticate(handler_call_details.invocation_metadata)
        try:
            authorize(principal, METHOD_OPERATIONS.get(method, Operation.GENERATE))
        except Refusal as refusal:
            from .errors import map_error

            mapped = map_error(refusal)
            message = (f"{method.rsplit('/', 1)[-1]} needs an admin key" if principal is not None
                       else "missing or unknown API key: send metadata 'authorization: Bearer <key>'")
            if self.on_refused is not None:
                self.on_refused(method, mapped.code)
            return _deny(await continuation(handler_call_details), mapped.code, message)
        return await continuation(handler_call_details)


def _deny(handler, code: grpc.StatusCode, message: str):
    """A handler of the same kind as `handler` that aborts with `code`."""
    if handler is None:
        return None

    async def abort(_request, context):
        await context.abort(code, message)

    options = dict(request_deserializer=handler.request_deserializer,
                   response_serializer=handler.response_serializer)
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(abort, **options)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(abort, **options)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(abort, **options)
    return grpc.stream_stream_rpc_method_handler(abort, **options)

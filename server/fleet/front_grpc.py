"""The fleet's gRPC front end: `loraplex serve`'s limits, then a forward to a replica.

Listens on --host:--port with serve's server options (--max-message-bytes on receive and
send) and serve's AuthInterceptor (keys checked before any replica work), answers
grpc.health.v1 itself from the replicas' state, and forwards each loraplex.v1 call (the
request's bytes as received) to a replica through a Ray Serve handle, with the generation
request's adapter as Ray's multiplexed model id (wire.routing_id: valid references only, digested).
A replica that dies mid-call is UNAVAILABLE (the SDK retries it); no Ray error text reaches a client.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import defaultdict
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from ..service.auth import KeyRing
from ..service.errors import ServiceError, abort_with, map_error
from .admission import Admission
from .methods import METHODS, Method, adapter_of
from .wire import CallStatus, ForwardedCall, Reply, routing_id

log = logging.getLogger("loraplex.fleet")
REPLICA_DIED_MESSAGE = "the replica serving this request stopped before finishing it; retry (another replica takes it)"
UPLOADS_AT_ONCE = 2


class GrpcForwarder:
    """Generic handlers for every forwarded loraplex.v1 method (requests stay serialized)."""

    def __init__(self, replicas: Any, admission: Admission, keys: KeyRing, max_upload_bytes: int):
        self.replicas = replicas                # DeploymentHandle of the replica deployment
        self.admission = admission
        self.keys = keys
        self.max_upload_bytes = max_upload_bytes
        self._uploads = asyncio.Semaphore(UPLOADS_AT_ONCE)

    def handlers(self) -> list[grpc.GenericRpcHandler]:
        by_service: dict[str, dict[str, grpc.RpcMethodHandler]] = defaultdict(dict)
        for method in METHODS.values():
            by_service[method.service][method.name] = self._handler(method)
        return [grpc.method_handlers_generic_handler(service, table) for service, table in by_service.items()]

    def _handler(self, method: Method) -> grpc.RpcMethodHandler:
        if method.server_stream:
            return grpc.unary_stream_rpc_method_handler(functools.partial(self._stream, method))
        if method.client_stream:
            return grpc.stream_unary_rpc_method_handler(functools.partial(self._upload, method))
        return grpc.unary_unary_rpc_method_handler(functools.partial(self._unary, method))

    # ---- the three shapes ----------------------------------------------------------------
    async def _unary(self, method: Method, payload: bytes, context: grpc.aio.ServicerContext) -> bytes:
        try:
            rid = self._routing(method, payload, context)
            with self._admitted(method):
                reply = await self._call("unary", rid, _forwarded(method, payload, context))
        except ServiceError as error:
            log_refused(method.path, error.code)
            await abort_with(context, map_error(error))
        return await _finish(method, reply, context)

    async def _stream(self, method: Method, payload: bytes, context: grpc.aio.ServicerContext):
        status = CallStatus("UNAVAILABLE", REPLICA_DIED_MESSAGE)
        try:
            rid = self._routing(method, payload, context)
            with self._admitted(method):
                handle = self.replicas.options(method_name="stream", stream=True, multiplexed_model_id=rid, _by_reference=False)
                responses = handle.remote(_forwarded(method, payload, context))
                ended = False
                try:
                    async for reply in responses:
                        if reply.status is not None:
                            status = reply.status
                        else:
                            yield reply.payload
                    ended = True
                except Exception as error:  # noqa: BLE001 - replica death or Ray failure: mapped
                    ended = True
                    raise _remote_error(error) from None
                finally:
                    if not ended:       # the caller went (cancel, deadline: CancelledError or GeneratorExit)
                        responses.cancel()      # so the replica stops generating
        except ServiceError as error:
            log_refused(method.path, error.code)
            await abort_with(context, map_error(error))
        await _finish(method, Reply(None, status), context)

    async def _upload(self, method: Method, messages, context: grpc.aio.ServicerContext) -> bytes:
        """Client streaming (UploadAdapter): the messages are collected (bounded), then forwarded."""
        try:
            async with self._uploads:
                payloads, total = [], 0
                async for payload in messages:
                    total += len(payload)
                    if total > self.max_upload_bytes:
                        raise ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED, "the upload is larger than "
                                           f"{self.max_upload_bytes} bytes (--max-adapter-bytes)")
                    payloads.append(payload)
                reply = await self._call("unary", "", _forwarded(method, tuple(payloads), context))
        except ServiceError as error:
            log_refused(method.path, error.code)
            await abort_with(context, map_error(error))
        return await _finish(method, reply, context)

    # ---- plumbing ------------------------------------------------------------------------
    def _routing(self, method: Method, payload: bytes, context: grpc.aio.ServicerContext) -> str:
        """The routing id of a generation request's adapter ("" otherwise)."""
        if not method.generation:
            return ""
        try:
            request = method.request.FromString(payload)
        except DecodeError:
            raise ServiceError(grpc.StatusCode.UNKNOWN, "the request message could not be parsed") from None
        adapter = adapter_of(method, request)
        return routing_id(adapter, self.keys.principal(context).tenant) if adapter else ""

    @contextlib.contextmanager
    def _admitted(self, method: Method):
        if not method.generation:
            yield
            return
        self.admission.enter()
        try:
            yield
        finally:
            self.admission.leave()

    async def _call(self, name: str, rid: str, call: ForwardedCall) -> Reply:
        response = self.replicas.options(method_name=name, multiplexed_model_id=rid, _by_reference=False).remote(call)
        try:
            return await response
        except asyncio.CancelledError:
            response.cancel()
            raise
        except Exception as error:  # noqa: BLE001 - replica death or Ray failure: mapped
            raise _remote_error(error) from None


def _forwarded(method: Method, payload: bytes | tuple[bytes, ...], context: grpc.aio.ServicerContext) -> ForwardedCall:
    remaining = context.time_remaining()
    return ForwardedCall(method.path, tuple(context.invocation_metadata() or ()), context.peer(), payload,
                         None if remaining is None else time.time() + remaining)


def log_refused(method: str, code: grpc.StatusCode | str) -> None:
    """One short line per call the fleet refuses or a replica ends with an error (issue 37 item 9:
    no tracebacks for expected rejections); no keys, adapter ids or peer addresses in it."""
    log.info("refused %s: %s", method, getattr(code, "name", code))


def _remote_error(error: Exception) -> ServiceError:
    """UNAVAILABLE for a replica that died (retryable); anything else INTERNAL, details logged only."""
    from ray.exceptions import RayActorError

    if isinstance(error, RayActorError):
        log.warning("a replica stopped during a call: %s", type(error).__name__)
        return ServiceError(grpc.StatusCode.UNAVAILABLE, REPLICA_DIED_MESSAGE, retry_after_s=1.0)
    mapped = map_error(error)                    # logs the traceback under an incident id
    return ServiceError(mapped.code, mapped.message)


async def _finish(method: Method, reply: Reply, context: grpc.aio.ServicerContext) -> bytes | None:
    status = reply.status or CallStatus()
    if status.code != "OK":
        log_refused(method.path, status.code)
        await context.abort(grpc.StatusCode[status.code], status.details, trailing_metadata=status.trailers)
    if status.trailers:
        context.set_trailing_metadata(status.trailers)
    return reply.payload

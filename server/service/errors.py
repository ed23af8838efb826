"""Map every error a servicer can meet to a gRPC status with google.rpc details.

One decorator, `rpc_errors`, wraps all servicer methods (unary, server-streaming and
client-streaming). Known errors become their status code with a safe message; anything else
becomes INTERNAL with a generic message and an incident id, and the traceback is logged
server-side under that id. Nothing from the exception text of unknown errors reaches clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import errno
import logging
import uuid
from dataclasses import dataclass

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2

from ..engine.io import (AdapterBackendUnavailable, AdapterUnavailable, EngineDraining, QueueFull,
                         RequestFailed, RequestRejected)

log = logging.getLogger("loraplex.service")

STATUS_DETAILS_KEY = "grpc-status-details-bin"


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


class ServiceError(Exception):
    """An error a servicer raises on purpose, already carrying its status code."""

    def __init__(self, code: grpc.StatusCode, message: str,
                 violations: tuple[FieldViolation, ...] = (), retry_after_s: float | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.violations = violations
        self.retry_after_s = retry_after_s


def invalid_argument(violations: list[FieldViolation]) -> ServiceError:
    summary = "; ".join(f"{v.field}: {v.description}" for v in violations)
    return ServiceError(grpc.StatusCode.INVALID_ARGUMENT, f"invalid request: {summary}", tuple(violations))


@dataclass(frozen=True)
class MappedStatus:
    code: grpc.StatusCode
    message: str
    violations: tuple[FieldViolation, ...] = ()
    retry_after_s: float | None = None

    def to_status_proto(self) -> status_pb2.Status:
        status = status_pb2.Status(code=self.code.value[0], message=self.message)
        if self.violations:
            request = error_details_pb2.BadRequest(field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                for v in self.violations])
            status.details.append(_pack(request))
        if self.retry_after_s is not None:
            delay = duration_pb2.Duration()
            delay.FromNanoseconds(int(self.retry_after_s * 1e9))
            status.details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
        return status


def _pack(message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def _store_error_codes() -> list[tuple[type, grpc.StatusCode]]:
    from ...adapters_store import errors as store

    return [
        (store.InvalidAdapterId, grpc.StatusCode.INVALID_ARGUMENT),
        (store.AdapterValidationError, grpc.StatusCode.INVALID_ARGUMENT),
        (store.AdapterNotFound, grpc.StatusCode.NOT_FOUND),
        (store.QuotaExceeded, grpc.StatusCode.RESOURCE_EXHAUSTED),
        (store.UploadConflict, grpc.StatusCode.ALREADY_EXISTS),
        (store.PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
        (store.IntegrityError, grpc.StatusCode.FAILED_PRECONDITION),
        (store.StoreUnavailable, grpc.StatusCode.UNAVAILABLE),
        (store.SchemaError, grpc.StatusCode.FAILED_PRECONDITION),
    ]


_STORE_FIELDS = {"InvalidAdapterId": "adapter_id", "AdapterValidationError": "adapter"}


def store_unavailable_message(error: BaseException) -> str:
    """What a caller sees while the registry or blob store is down: no endpoint, no URL (the
    backend's own message names them), an incident id; the details go to the server log."""
    incident = uuid.uuid4().hex[:12]
    log.warning("adapter store unavailable (incident %s): %s", incident, error)
    return f"the adapter store is unavailable; retry shortly (incident {incident})"


def is_store_unavailable(error: BaseException) -> bool:
    if not type(error).__module__.startswith("loraplex.adapters_store"):
        return False
    from ...adapters_store.errors import StoreUnavailable

    return isinstance(error, StoreUnavailable)


def map_error(error: BaseException) -> MappedStatus:
    """The status for an error; unknown errors map to INTERNAL with an incident id (logged)."""
    if isinstance(error, ServiceError):
        return MappedStatus(error.code, error.message, error.violations, error.retry_after_s)
    if isinstance(error, RequestRejected):
        violations = tuple(FieldViolation(v.field, v.description) for v in error.violations)
        return MappedStatus(grpc.StatusCode.INVALID_ARGUMENT, str(error), violations)
    if isinstance(error, QueueFull):
        return MappedStatus(grpc.StatusCode.RESOURCE_EXHAUSTED, str(error), retry_after_s=error.retry_after_s)
    if isinstance(error, EngineDraining):
        return MappedStatus(grpc.StatusCode.UNAVAILABLE, str(error) or "the server is shutting down")
    if isinstance(error, AdapterBackendUnavailable) or is_store_unavailable(error):
        return MappedStatus(grpc.StatusCode.UNAVAILABLE, store_unavailable_message(error),
                            retry_after_s=getattr(error, "retry_after_s", None))
    if isinstance(error, AdapterUnavailable):
        return MappedStatus(grpc.StatusCode.FAILED_PRECONDITION, str(error))
    if isinstance(error, RequestFailed):
        return MappedStatus(grpc.StatusCode.INTERNAL, str(error) or "the request failed")
    if isinstance(error, DecodeError):
        # A client-streaming request message that does not parse: grpcio hands the protobuf
        # error to the servicer's iterator. Same code as for unary calls (docs/server.md).
        return MappedStatus(grpc.StatusCode.UNKNOWN, "a request message could not be parsed (corrupt wire "
                                                     "format or invalid UTF-8 in a string field)")
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        log.error("disk full: %s", error)
        return MappedStatus(grpc.StatusCode.RESOURCE_EXHAUSTED,
                            "the server's disk is full; nothing was stored (an operator must free space)")
    from_store = type(error).__module__.startswith("loraplex.adapters_store")
    for error_type, code in _store_error_codes() if from_store else ():
        if isinstance(error, error_type):
            name = _STORE_FIELDS.get(error_type.__name__)
            violations = (FieldViolation(name, str(error)),) if name and code is grpc.StatusCode.INVALID_ARGUMENT else ()
            return MappedStatus(code, str(error), violations, getattr(error, "retry_after_s", None))
    incident = uuid.uuid4().hex[:12]
    log.error("internal error (incident %s)", incident, exc_info=error)
    return MappedStatus(grpc.StatusCode.INTERNAL, f"internal server error (incident {incident})")


async def abort_with(context: grpc.aio.ServicerContext, mapped: MappedStatus) -> None:
    """Abort the RPC with the mapped status and its rich details in the trailers."""
    kept = tuple((key, value) for key, value in (context.trailing_metadata() or ()) if key != STATUS_DETAILS_KEY)
    trailer = kept + ((STATUS_DETAILS_KEY, mapped.to_status_proto().SerializeToString()),)
    await context.abort(mapped.code, mapped.message, trailing_metadata=trailer)


def rpc_errors(method):
    """Decorator for servicer methods: map raised errors to statuses (see module doc)."""
    if inspect.isasyncgenfunction(method):
        @functools.wraps(method)
        async def stream_wrapper(self, request, context):
            try:
                async with contextlib.aclosing(method(self, request, context)) as items:
                    async for item in items:
                        yield item
            except (asyncio.CancelledError, grpc.aio.AbortError):
                raise
            except Exception as error:  # noqa: BLE001 - mapped, unknown ones logged
                await abort_with(context, map_error(error))
        return stream_wrapper

    @functools.wraps(method)
    async def unary_wrapper(self, request, context):
        try:
            return await method(self, request, context)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as error:  # noqa: BLE001 - mapped, unknown ones logged
            await abort_with(context, map_error(error))
    return unary_wrapper

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
import logging
from dataclasses import dataclass
from typing import Callable

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2

from ..frontdoor.errors import Kind, refusal_of

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


# The front door's kinds (frontdoor/errors.py) -> gRPC status codes: the only gRPC-specific rule.
KIND_CODES = {
    Kind.INVALID: grpc.StatusCode.INVALID_ARGUMENT, Kind.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    Kind.PERMISSION_DENIED: grpc.StatusCode.PERMISSION_DENIED, Kind.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    Kind.CONFLICT: grpc.StatusCode.ALREADY_EXISTS, Kind.PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
    Kind.TOO_LARGE: grpc.StatusCode.RESOURCE_EXHAUSTED, Kind.BUSY: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Kind.DISK_FULL: grpc.StatusCode.RESOURCE_EXHAUSTED, Kind.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    Kind.INTERNAL: grpc.StatusCode.INTERNAL,
}


def map_error(error: BaseException, rename: Callable[[str], str] = lambda field: field) -> MappedStatus:
    """The status for an error; unknown errors map to INTERNAL with an incident id (logged).
    `rename` turns the front door's neutral field names into this RPC's proto paths."""
    if isinstance(error, ServiceError):
        return MappedStatus(error.code, error.message, error.violations, error.retry_after_s)
    if isinstance(error, DecodeError):
        # A client-streaming request message that does not parse: grpcio hands the protobuf
        # error to the servicer's iterator. Same code as for unary calls (docs/server.md).
        return MappedStatus(grpc.StatusCode.UNKNOWN, "a request message could not be parsed (corrupt wire "
                                                     "format or invalid UTF-8 in a string field)")
    refusal = refusal_of(error)
    code = KIND_CODES[refusal.kind]
    violations = tuple(FieldViolation(rename(p.field), p.description) for p in refusal.problems)
    if code is not grpc.StatusCode.INVALID_ARGUMENT:
        violations = ()
    return MappedStatus(code, refusal.message, violations, refusal.retry_after_s)


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

"""Exceptions raised by the SDK, one per gRPC status family, with the server's message and details.

    LoraplexError                 .code (grpc.StatusCode), .message, .details (google.rpc messages)
    ├── ValidationError           INVALID_ARGUMENT (+ .violations {field: description}); also raised
    │                             locally, before anything is sent, e.g. for a bad adapter directory
    ├── AdapterNotFoundError      NOT_FOUND
    ├── AdapterRejectedError      FAILED_PRECONDITION (e.g. base mismatch, quarantined adapter)
    ├── AlreadyExistsError        ALREADY_EXISTS (a concurrent upload of the same name)
    ├── OverloadedError           RESOURCE_EXHAUSTED (+ .retry_after seconds from RetryInfo, or None)
    ├── AuthenticationError       UNAUTHENTICATED
    ├── PermissionDeniedError     PERMISSION_DENIED
    ├── ServerUnavailableError    UNAVAILABLE (+ .address)
    ├── DeadlineExceededError     DEADLINE_EXCEEDED; also a builtin TimeoutError
    └── ServerError               INTERNAL, UNKNOWN and every other code
"""

from __future__ import annotations

from typing import Any, Iterable

import grpc
from google.protobuf import message as pb_message
from google.rpc import error_details_pb2, status_pb2

STATUS_DETAILS_KEY = "grpc-status-details-bin"
_DETAIL_TYPES = (error_details_pb2.BadRequest, error_details_pb2.RetryInfo, error_details_pb2.ErrorInfo,
                 error_details_pb2.DebugInfo, error_details_pb2.QuotaFailure,
                 error_details_pb2.PreconditionFailure, error_details_pb2.ResourceInfo,
                 error_details_pb2.Help, error_details_pb2.LocalizedMessage)


class LoraplexError(Exception):
    """Base of every SDK error: `.code`, `.message` (the server's text), `.details` (rich details)."""

    default_code = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str, code: grpc.StatusCode | None = None,
                 details: Iterable[pb_message.Message] = ()):
        super().__init__(message)
        self.message = message
        self.code = code or self.default_code
        self.details = list(details)

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"


class ValidationError(LoraplexError):
    """The request (or a local input such as an adapter directory) is invalid; see `.violations`."""

    default_code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, message: str, code: grpc.StatusCode | None = None,
                 details: Iterable[pb_message.Message] = (), violations: dict[str, str] | None = None):
        super().__init__(message, code, details)
        found = {v.field: v.description for d in self.details if isinstance(d, error_details_pb2.BadRequest)
                 for v in d.field_violations}
        self.violations: dict[str, str] = {**found, **(violations or {})}


class AdapterNotFoundError(LoraplexError):
    default_code = grpc.StatusCode.NOT_FOUND


class AdapterRejectedError(LoraplexError):
    default_code = grpc.StatusCode.FAILED_PRECONDITION


class AlreadyExistsError(LoraplexError):
    default_code = grpc.StatusCode.ALREADY_EXISTS


class OverloadedError(LoraplexError):
    """The server's queue (or a quota) is full; `.retry_after` is the server's hint in seconds."""

    default_code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, code: grpc.StatusCode | None = None,
                 details: Iterable[pb_message.Message] = ()):
        super().__init__(message, code, details)
        self.retry_after: float | None = retry_after_s(self.details)


class AuthenticationError(LoraplexError):
    default_code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDeniedError(LoraplexError):
    default_code = grpc.StatusCode.PERMISSION_DENIED


class ServerUnavailableError(LoraplexError):
    """The server cannot be reached, is starting, or is shutting down. `.address` is the target."""

    default_code = grpc.StatusCode.UNAVAILABLE

    def __init__(self, message: str, code: grpc.StatusCode | None = None,
                 details: Iterable[pb_message.Message] = (), address: str = ""):
        super().__init__(message, code, details)
        self.address = address

    @property
    def unreachable(self) -> bool:
        """True when no connection could be made (as opposed to a server that refused the call)."""
        text = self.message.lower()
        return any(hint in text for hint in ("connect", "connection refused", "dns", "name resolution"))


class DeadlineExceededError(LoraplexError, TimeoutError):
    """The call's deadline (its `timeout`) passed before the server answered."""

    default_code = grpc.StatusCode.DEADLINE_EXCEEDED


class ServerError(LoraplexError):
    default_code = grpc.StatusCode.INTERNAL


_BY_CODE: dict[grpc.StatusCode, type[LoraplexError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: ValidationError,
    grpc.StatusCode.OUT_OF_RANGE: ValidationError,
    grpc.StatusCode.NOT_FOUND: AdapterNotFoundError,
    grpc.StatusCode.FAILED_PRECONDITION: AdapterRejectedError,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExistsError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: OverloadedError,
    grpc.StatusCode.UNAUTHENTICATED: AuthenticationError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.UNAVAILABLE: ServerUnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
}


def error_class(code: grpc.StatusCode) -> type[LoraplexError]:
    return _BY_CODE.get(code, ServerError)


def from_rpc_error(error: grpc.RpcError, address: str = "") -> LoraplexError:
    """The typed SDK error for a failed sync or asyncio gRPC call, rich details decoded."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    message = (error.details() if hasattr(error, "details") else None) or str(code.name).lower()
    details = rich_details(_trailing(error))
    cls = error_class(code)
    if cls is ServerUnavailableError:
        return ServerUnavailableError(message, code, details, address=address)
    return cls(message, code, details)


def _trailing(error: grpc.RpcError) -> Iterable[tuple[str, Any]]:
    trailing = getattr(error, "trailing_metadata", None)
    found = trailing() if callable(trailing) else None
    return tuple(found) if found is not None else ()


def rich_details(trailing_metadata: Iterable[tuple[str, Any]]) -> list[pb_message.Message]:
    """Decode the google.rpc.Status in `grpc-status-details-bin` into its detail messages."""
    for key, value in trailing_metadata:
        if key != STATUS_DETAILS_KEY:
            continue
        status = status_pb2.Status.FromString(value if isinstance(value, bytes) else value.encode("latin-1"))
        return [detail for detail in map(_unpack, status.details) if detail is not None]
    return []


def _unpack(any_detail) -> pb_message.Message | None:
    for detail_type in _DETAIL_TYPES:
        if any_detail.Is(detail_type.DESCRIPTOR):
            detail = detail_type()
            any_detail.Unpack(detail)
            return detail
    return None


def retry_after_s(details: Iterable[pb_message.Message]) -> float | None:
    """The RetryInfo delay in seconds, or None when the server gave none."""
    for detail in details:
        if isinstance(detail, error_details_pb2.RetryInfo):
            return detail.retry_delay.ToNanoseconds() / 1e9
    return None

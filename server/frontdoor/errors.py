"""Transport-neutral refusals: every error a front end can meet -> one `Refusal` of one `Kind`.

Each transport maps a Kind to its own status with one table (gRPC: service/errors.py,
HTTP: http/errors.py); the rules of which error is which kind live only here, so gRPC and
HTTP cannot answer the same problem differently. Unknown errors become INTERNAL with an
incident id; their text never reaches a client (the traceback is logged under that id).
"""

from __future__ import annotations

import enum
import errno
import logging
import uuid
from dataclasses import dataclass

from ..engine.io import (AdapterBackendUnavailable, AdapterUnavailable, EngineDraining, QueueFull, RequestFailed,
                         RequestRejected)

log = logging.getLogger("loraplex.frontdoor")


class Kind(enum.Enum):
    """What went wrong, as the caller should see it (one status per transport)."""

    INVALID = "invalid"                    # the request's fault: gRPC INVALID_ARGUMENT, HTTP 400
    UNAUTHENTICATED = "unauthenticated"    # 401
    PERMISSION_DENIED = "permission_denied"  # 403
    NOT_FOUND = "not_found"                # 404
    CONFLICT = "conflict"                  # ALREADY_EXISTS, 409
    PRECONDITION = "precondition"          # FAILED_PRECONDITION (quarantined, integrity), 409
    TOO_LARGE = "too_large"                # RESOURCE_EXHAUSTED, 413 (body, quota)
    BUSY = "busy"                          # RESOURCE_EXHAUSTED, 429 (queue full, retry later)
    DISK_FULL = "disk_full"                # RESOURCE_EXHAUSTED, 507
    UNAVAILABLE = "unavailable"            # UNAVAILABLE, 503 (loading, draining, registry down)
    INTERNAL = "internal"                  # INTERNAL, 500


@dataclass(frozen=True)
class Problem:
    """One field's problem; `field` is the neutral name (adapter_id, path, n, prompt, tokens,
    or an engine path such as sampling.top_p); each transport renames it to its own wire name."""

    field: str
    description: str


class Refusal(Exception):
    """A request refused on purpose: kind, a safe message, the fields at fault, a retry hint."""

    def __init__(self, kind: Kind, message: str, problems: tuple[Problem, ...] = (),
                 retry_after_s: float | None = None, code: str | None = None):
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.problems = problems
        self.retry_after_s = retry_after_s
        self.code = code                     # a short machine-readable reason (HTTP's error.code)

    @property
    def field(self) -> str | None:
        return self.problems[0].field if self.problems else None


def invalid(field: str, description: str, code: str | None = None) -> Refusal:
    """The request's fault, naming the field (neutral name)."""
    return Refusal(Kind.INVALID, f"{field}: {description}" if field else description, (Problem(field, description),),
                   code=code)


def refusal_of(error: BaseException) -> Refusal:
    """The Refusal for any error raised while serving a request (unknown ones logged, INTERNAL)."""
    if isinstance(error, Refusal):
        return error
    mapped = _from_engine(error) or _from_store(error)
    if mapped is not None:
        return mapped
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        log.error("disk full: %s", error)
        return Refusal(Kind.DISK_FULL, "the server's disk is full; nothing was stored (an operator must free space)")
    if isinstance(error, RecursionError):
        return Refusal(Kind.INVALID, "the request is nested too deeply", code="too_deep")
    incident = uuid.uuid4().hex[:12]
    log.error("internal error (incident %s)", incident, exc_info=error)
    return Refusal(Kind.INTERNAL, f"internal server error (incident {incident})", code="internal_error")


def store_unavailable_message(error: BaseException) -> str:
    """What a caller sees while the registry or blob store is down: no endpoint, no URL (the
    backend's own message names them), an incident id; the details go to the server log."""
    incident = uuid.uuid4().hex[:12]
    log.warning("adapter store unavailable (incident %s): %s", incident, error)
    return f"the adapter store is unavailable; retry shortly (incident {incident})"


def is_store_unavailable(error: BaseException) -> bool:
    if isinstance(error, AdapterBackendUnavailable):
        return True
    if not type(error).__module__.startswith("loraplex.adapters_store"):
        return False
    from ...adapters_store.errors import StoreUnavailable

    return isinstance(error, StoreUnavailable)


def _from_engine(error: BaseException) -> Refusal | None:
    if is_store_unavailable(error):
        return Refusal(Kind.UNAVAILABLE, store_unavailable_message(error),
                       retry_after_s=getattr(error, "retry_after_s", None) or 1.0, code="store_unavailable")
    if isinstance(error, RequestRejected):
        problems = tuple(Problem(v.field, v.description) for v in error.violations)
        return Refusal(Kind.INVALID, str(error), problems)
    if isinstance(error, QueueFull):
        return Refusal(Kind.BUSY, str(error), retry_after_s=error.retry_after_s, code="queue_full")
    if isinstance(error, EngineDraining):
        return Refusal(Kind.UNAVAILABLE, str(error) or "the server is shutting down", retry_after_s=1.0)
    if isinstance(error, AdapterUnavailable):
        return Refusal(Kind.PRECONDITION, str(error), code="adapter_unavailable")
    if isinstance(error, RequestFailed):
        return Refusal(Kind.INTERNAL, str(error) or "the request failed", code="request_failed")
    return None


_STORE_KINDS = (("InvalidAdapterId", Kind.INVALID, "adapter_id"), ("AdapterValidationError", Kind.INVALID, "adapter"),
                ("AdapterNotFound", Kind.NOT_FOUND, None), ("QuotaExceeded", Kind.TOO_LARGE, None),
                ("UploadConflict", Kind.CONFLICT, None), ("PermissionDenied", Kind.PERMISSION_DENIED, None),
                ("IntegrityError", Kind.PRECONDITION, None),
                ("SchemaError", Kind.PRECONDITION, None))


def _from_store(error: BaseException) -> Refusal | None:
    if not type(error).__module__.startswith("loraplex.adapters_store"):
        return None
    from ...adapters_store import errors as store

    for name, kind, field in _STORE_KINDS:
        if isinstance(error, getattr(store, name)):
            problems = (Problem(field, str(error)),) if field else ()
            code = "model_not_found" if kind is Kind.NOT_FOUND else None
            return Refusal(kind, str(error), problems, getattr(error, "retry_after_s", None), code)
    return None

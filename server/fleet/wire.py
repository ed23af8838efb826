"""What the fleet's front end and a replica pass each other through Ray (plain, picklable data).

The front end (server/fleet/front_grpc.py, front_http.py) terminates the client's connection,
checks keys and limits, and forwards one of these to a replica; the replica answers with
`Reply` items (gRPC) or an `HttpHead` followed by body chunks (HTTP).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from ..engine.validation import ADAPTER_REF_RE

Metadata = tuple[tuple[str, Any], ...]


@dataclass(frozen=True)
class ForwardedCall:
    """One gRPC call as the front end received it (key already checked there)."""

    method: str                          # "/loraplex.v1.GenerationService/Generate"
    metadata: Metadata                   # the caller's metadata (the replica reads the key's tenant)
    peer: str
    payload: bytes | tuple[bytes, ...]   # the serialized request; client streaming: every message
    deadline_unix: float | None = None   # the caller's deadline, wall clock (time.time()): the replica
                                         # then sees it expire when the front end does, not a transfer later


@dataclass(frozen=True)
class CallStatus:
    """How a forwarded call ended: a gRPC status code name, details and trailers."""

    code: str = "OK"
    details: str = ""
    trailers: Metadata = ()


@dataclass(frozen=True)
class Reply:
    """A response message (`payload`) or, last, the call's status."""

    payload: bytes | None = None
    status: CallStatus | None = None


@dataclass(frozen=True)
class HttpCall:
    """One HTTP request as the front end received it (body read within --max-message-bytes)."""

    method: str
    path: str
    query: bytes
    headers: tuple[tuple[str, str], ...]
    body: bytes
    client: str = ""


@dataclass(frozen=True)
class HttpHead:
    """The start of an HTTP response; body chunks (bytes) follow."""

    status: int
    headers: tuple[tuple[str, str], ...]
    replica: str


def routing_id(adapter_ref: str, tenant: str | None) -> str:
    """Ray's multiplexed model id for a request's adapter: a fixed-size digest of (tenant, ref).

    Never the adapter id itself, so Ray's own metrics and router state hold no tenant's private
    adapter name and no caller-chosen string; "" (no routing) for a reference that is not valid.
    Tenant-scoped because tenants' private adapters of the same name are different adapters.
    """
    if not adapter_ref or not ADAPTER_REF_RE.fullmatch(adapter_ref):
        return ""
    digest = hashlib.sha256(f"{tenant or ''}\0{adapter_ref}".encode()).hexdigest()
    return "a" + digest[:24]

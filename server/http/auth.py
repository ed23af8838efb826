"""The gRPC API's keys over HTTP: `Authorization: Bearer KEY` -> the caller's Principal.

`KeyRing.authenticate` (service/auth.py) does the constant-time comparison for both APIs;
what a principal may do is the front door's rule (frontdoor/access.py `authorize`).
"""

from __future__ import annotations

from starlette.requests import Request

from ..frontdoor.access import Principal
from ..service.auth import KeyRing


def authenticate(keys: KeyRing, request: Request) -> Principal | None:
    """The caller, or None without a valid key (the front door answers 401)."""
    header = request.headers.get("authorization")
    return keys.authenticate([("authorization", header)] if header is not None else [])

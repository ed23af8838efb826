"""The gRPC API's keys, roles and tenants over HTTP: `Authorization: Bearer KEY`.

`KeyRing.authenticate` (service/auth.py) does the constant-time comparison for both APIs.
"""

from __future__ import annotations

from starlette.requests import Request

from ..service.auth import KeyRing, Principal, Role
from .errors import ApiError


def authenticate(keys: KeyRing, request: Request, admin: bool = False) -> Principal:
    """The caller; 401 without a valid key, 403 when `admin` is needed and the key is not one."""
    header = request.headers.get("authorization")
    principal = keys.authenticate([("authorization", header)] if header is not None else [])
    if principal is None:
        raise ApiError(401, "missing or unknown API key: send the header 'Authorization: Bearer <key>'",
                       code="invalid_api_key")
    if admin and principal.role is not Role.ADMIN:
        raise ApiError(403, "this endpoint needs an admin key", code="permission_denied")
    return principal

"""Authorization, the same for every transport: roles, tenants, public and private adapters.

A transport authenticates the caller (a bearer key -> `Principal`, service/auth.py's KeyRing)
and names the `Operation`; `authorize` decides. Who may write which adapter id is the store's
rule (adapters_store/store.py `_check_owner`): the front door always hands it the caller's
tenant, at start and again at commit, so no transport can forget it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from .errors import Kind, Refusal, invalid


class Role(enum.Enum):
    INFERENCE = "inference"
    ADMIN = "admin"


@dataclass(frozen=True)
class Principal:
    """Who is calling: the key's role and tenant (None = no tenant, public adapters only)."""

    role: Role
    tenant: str | None = None


ANONYMOUS_ADMIN = Principal(Role.ADMIN, None)     # every caller when auth is off


class Operation(enum.Enum):
    """What a caller asks to do; `admin` operations write the adapter store."""

    GENERATE = ("generate", False)
    TOKENIZE = ("tokenize", False)
    READ_ADAPTERS = ("read adapters", False)
    UPLOAD = ("upload an adapter", True)
    REGISTER = ("register an adapter", True)
    DELETE = ("delete an adapter", True)
    RESET_CACHE = ("reset the prefix cache", True)

    @property
    def admin(self) -> bool:
        return self.value[1]


UNAUTHENTICATED_MESSAGE = "missing or unknown API key: send 'Authorization: Bearer <key>'"


def authorize(principal: Principal | None, operation: Operation) -> Principal:
    """The principal when it may run `operation`; UNAUTHENTICATED or PERMISSION_DENIED otherwise."""
    if principal is None:
        raise Refusal(Kind.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE, code="invalid_api_key")
    if operation.admin and principal.role is not Role.ADMIN:
        raise Refusal(Kind.PERMISSION_DENIED, f"to {operation.value[0]} needs an admin key",
                      code="permission_denied")
    return principal


def owner_for(principal: Principal, private: bool) -> str | None:
    """The owner a new adapter gets: the caller's tenant when private, None (public) otherwise."""
    if private and principal.tenant is None:
        raise invalid("private", "private adapters need a key with a tenant ('tenant:key')")
    return principal.tenant if private else None

"""Typed errors of the adapter store; every message says what to fix."""

from __future__ import annotations


class StoreError(ValueError):
    """Base class of every adapter store error."""


class InvalidAdapterId(StoreError):
    """An adapter id or reference does not follow the id grammar."""


class AdapterNotFound(StoreError):
    """No visible adapter matches the reference (also used for other tenants' private adapters)."""


class AdapterValidationError(StoreError):
    """An adapter broke one validation rule; `rule` names it (e.g. "rank_limit")."""

    def __init__(self, rule: str, message: str):
        super().__init__(f"{message} [rule: {rule}]")
        self.rule = rule
        self.detail = message


class QuotaExceeded(StoreError):
    """Storing the adapter would exceed the store-wide byte quota."""


class UploadConflict(StoreError):
    """The id is owned by another tenant, or the upload session is already finished."""


class PermissionDenied(StoreError):
    """The operation is not allowed (e.g. a register path outside the allowed roots)."""


PUBLIC_WRITE = ("public adapter {name!r} can only be {action} with an admin key without a tenant (an operator "
                "key); tenant admin keys manage their tenant's private adapters and may publish new ids")


class IntegrityError(StoreError):
    """A stored blob no longer matches its recorded sha256 (the adapter gets quarantined)."""


class StoreUnavailable(StoreError):
    """The registry database or the blob store cannot be reached (retry later). Messages name the
    backend URL without its password."""

    def __init__(self, message: str, retry_after_s: float = 2.0):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class SchemaError(StoreError):
    """The registry's schema is newer than this code knows, or cannot be migrated."""

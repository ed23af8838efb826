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


class IntegrityError(StoreError):
    """A stored blob no longer matches its recorded sha256 (the adapter gets quarantined)."""

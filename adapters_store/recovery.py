"""Start-up recovery: bring the blobs and the registry back to a consistent state after a crash."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from .blobs import BlobStore
from .records import AdapterState
from .registry import Registry
from .staging import sweep

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RecoveryReport:
    """What recover() removed or changed (relative paths / adapter keys)."""

    staging_removed: list[str] = field(default_factory=list)
    blobs_removed: list[str] = field(default_factory=list)
    deletions_finished: list[str] = field(default_factory=list)
    quarantined: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not (self.staging_removed or self.blobs_removed or self.deletions_finished or self.quarantined)

    def summary(self) -> str:
        return (f"{len(self.staging_removed)} staging dirs, {len(self.blobs_removed)} orphan blobs removed; "
                f"{len(self.deletions_finished)} deletions finished; {len(self.quarantined)} quarantined")


def recover(registry: Registry, blobs: BlobStore, tmp_root: Path) -> RecoveryReport:
    """Remove abandoned staging dirs and orphan blobs, finish interrupted deletions, quarantine
    rows whose blobs are missing. Safe while other processes use the store (they hold locks)."""
    finished = []
    for record in registry.all():
        if record.state is AdapterState.DELETING:
            registry.delete_rows(record.name, [record.version])
            finished.append(record.key)
    quarantined = []
    for record in registry.all():
        missing = [d for d in (record.sha256, record.config_sha256) if not blobs.exists(d)]
        if missing and record.state is AdapterState.READY:
            registry.set_state(record.name, [record.version], AdapterState.QUARANTINED,
                               f"blob(s) {missing} missing from disk; delete and upload again")
            quarantined.append(record.key)
    with blobs.collecting():
        staging = sweep(tmp_root)
        removed = blobs.remove_unreferenced(registry.referenced_digests)
    report = RecoveryReport(staging, removed, finished, quarantined)
    (log.info if report.clean else log.warning)("adapter store recovery: %s", report.summary())
    return report

"""Start-up recovery and store-wide GC: bring blobs and registry back to a consistent state."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from .fsutil import file_lock
from .records import AdapterState
from .registry import SqlRegistry
from .staging import sweep

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RecoveryReport:
    """What recover() / collect_garbage() removed or changed (relative paths or keys / adapter keys)."""

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


def finish_stale_deletions(registry: SqlRegistry, older_than_s: float) -> list[str]:
    """Remove the rows of deletions that were interrupted (DELETING for longer than `older_than_s`)."""
    finished = []
    cutoff = time.time() - older_than_s
    for record in registry.all():
        if record.state is AdapterState.DELETING and record.state_changed_at <= cutoff:
            registry.delete_rows(record.name, [record.version])
            finished.append(record.key)
    return finished


def recover(registry: SqlRegistry, blobs, tmp_root: Path, staging_lock: Path, collect_blobs: bool = True,
            stale_delete_s: float = 0.0) -> RecoveryReport:
    """Remove abandoned staging dirs, finish interrupted deletions, quarantine rows whose blobs are
    missing, and (collect_blobs) remove orphan blobs. Safe while other processes use the store."""
    finished = finish_stale_deletions(registry, stale_delete_s)
    rows = registry.all()                          # rows first: a row's blobs are stored before it
    present = blobs.list_digests()
    quarantined = []
    for record in rows:
        missing = [d for d in (record.sha256, record.config_sha256) if d not in present]
        if missing and record.state is AdapterState.READY:
            if registry.set_state(record.name, [record.version], AdapterState.QUARANTINED,
                                  f"blob(s) {missing} missing from the blob store; delete and upload again",
                                  (AdapterState.READY,)):
                quarantined.append(record.key)
    with file_lock(staging_lock, exclusive=True):
        staging = sweep(tmp_root)
    removed = []
    if collect_blobs:
        with registry.collecting():
            removed = blobs.remove_unreferenced(registry.referenced_digests)
    report = RecoveryReport(staging, removed, finished, quarantined)
    (log.info if report.clean else log.warning)("adapter store recovery: %s", report.summary())
    return report


def collect_garbage(registry: SqlRegistry, blobs, stale_delete_s: float) -> RecoveryReport:
    """Store-wide GC: finish stale deletions, then delete every blob no row refers to.

    Runs under the registry's exclusive blob lock, so no blob a writer is storing (it holds the
    shared lock until its row is inserted) is collected; rows in any state keep their blobs."""
    finished = finish_stale_deletions(registry, stale_delete_s)
    with registry.collecting():
        removed = blobs.remove_unreferenced(registry.referenced_digests)
    report = RecoveryReport([], removed, finished, [])
    log.info("adapter store gc: %s", report.summary())
    return report

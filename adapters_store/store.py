"""AdapterStore: the facade the service and the engine use (registry + blobs + host tier)."""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from .adapter_template import (TEMPLATE_NAME, TOKENIZER_CONFIG_NAME, TemplateCheck, check_template,
                               template_source, template_text)
from .adapter_tokenizer import TokenizerBundle, bundle_files, staged_tokenizer, tokenizer_sources
from .backends import open_backends
from .cache import EventHook, HostCache
from .config import StoreConfig
from .errors import (PUBLIC_WRITE, AdapterNotFound, AdapterValidationError, IntegrityError, PermissionDenied,
                     QuotaExceeded, StoreUnavailable, UploadConflict)
from .fsutil import file_lock
from .ids import parse_key, parse_ref, validate_name
from .leases import LeaseTable
from .loader import AdapterLoader
from .paths import CONFIG_NAME, WEIGHTS_NAME, adapter_files, confined_adapter_dir, copy_bounded
from .records import AdapterRecord, AdapterState, NewAdapter
from .recovery import RecoveryReport, collect_garbage, recover
from .staging import HashingWriter, StagingDir
from .types import BaseSpec, LoadedAdapter
from .upload import StagedAdapter, UploadMeta, UploadSession
from .validation import validate_adapter

__all__ = ["AdapterStore", "StoreConfig", "UploadMeta"]
log = logging.getLogger(__name__)
_LIVE = (AdapterState.READY, AdapterState.QUARANTINED)
_MAX_REMEMBERED = 4096


class AdapterStore:
    """Adapters in a registry + blob store (see docs/adapter-store.md), validated against `base`.

    The backends come from config.registry_url / config.blobs_url (default: SQLite file and
    directory under `root`); `root` always holds this process's staging area and blob cache.
    Opening a store runs recover(); its report is `self.recovery`. Thread-safe; several
    processes (or, with shared backends, servers) may share one store, but leases are per process.
    """

    def __init__(self, root: Path, config: StoreConfig, base: BaseSpec, on_event: EventHook | None = None):
        self.root = Path(root)
        self.config = config
        self.base = base
        self.root.mkdir(parents=True, exist_ok=True)
        self._tmp_root = self.root / "tmp"
        self._staging_lock = self.root / "staging.lock"
        self._backends = open_backends(self.root, config)
        self._registry, self._blobs = self._backends.registry, self._backends.blobs
        self.shared = self._backends.shared
        self._stale_delete_s = config.stale_delete_s if self._registry.shared else 0.0
        try:
            self.recovery: RecoveryReport = recover(self._registry, self._blobs, self._tmp_root,
                                                    self._staging_lock, collect_blobs=not self.shared,
                                                    stale_delete_s=self._stale_delete_s)
        except BaseException:
            self._backends.close()
            raise
        self._leases = LeaseTable()
        self._resolved: OrderedDict[tuple[str, str | None], AdapterRecord] = OrderedDict()
        self._resolved_lock = threading.Lock()
        self.cache = HostCache(config.host_cache_bytes, on_event)
        self._loader = AdapterLoader(self.cache, self._blobs.read, self._loadable, self.quarantine,
                                     config.load_threads)
        self._janitor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="adapter-delete")
        self._closed = threading.Event()
        self._template_check: TemplateCheck | None = None
        self._base_tokens: tuple[str, ...] | None = None

    # ---- writes ----------------------------------------------------------------------
    def begin_upload(self, meta: UploadMeta) -> UploadSession:
        """Start an upload; sizes, quota and ownership are checked before any byte is accepted."""
        validate_name(meta.name)
        self._check_owner(meta.name, meta.owner, meta.tenant if meta.tenant is not None else meta.owner)
        for label, size in (("config", meta.config_size), ("weights", meta.weights_size)):
            if size < 1:
                raise _size_error(f"declared {label} size must be >= 1 byte")
        if meta.config_size > self.config.max_config_bytes:
            raise _size_error(f"adapter_config.json of {meta.config_size} bytes exceeds the limit of "
                              f"{self.config.max_config_bytes}")
        if meta.chat_template_size > self.config.max_chat_template_bytes:
            raise AdapterValidationError("chat_template", f"{TEMPLATE_NAME}: the chat template is "
                                         f"{meta.chat_template_size} bytes, above the limit of "
                                         f"{self.config.max_chat_template_bytes}")
        for file_name, size, _ in meta.tokenizer_files:
            if size > self.config.max_tokenizer_bytes:
                raise AdapterValidationError("tokenizer", f"{file_name} is {size} bytes, above the limit of "
                                             f"{self.config.max_tokenizer_bytes} (StoreConfig.max_tokenizer_bytes)")
        total = meta.config_size + meta.weights_size + meta.tokenizer_bytes
        if total > self.config.max_adapter_bytes:
            raise _size_error(f"the adapter is {total} bytes, above the limit of {self.config.max_adapter_bytes}; "
                              f"raise --max-adapter-bytes or use a smaller rank")
        self._check_quota(total)
        staging = StagingDir(self._tmp_root, "upload", self._staging_guard)
        return UploadSession(meta, staging, self.config.max_chunk_bytes, self._commit_staged)

    def register_path(self, name: str, path: str | Path, owner: str | None = None,
                      allow_base_mismatch: bool = False, tenant: str | None = None) -> AdapterRecord:
        """Register a PEFT directory under an allowed root, or an `s3://bucket/path/` one under an allowed
        adapter source (copied into the store with the same validation as an upload; admin only).

        `tenant` is the caller's tenant (defaults to `owner`); see `_check_owner` for who may write."""
        validate_name(name)
        self._check_owner(name, owner, tenant if tenant is not None else owner)
        if str(path).startswith("s3://"):
            from .s3_source import allowed_location
            allowed_location(str(path), self.config.adapter_sources)     # refused before any staging
        staging = StagingDir(self._tmp_root, "register", self._staging_guard)
        try:
            digests, total = self._fetch_into(staging, path)
            self._check_quota(total)
            return self._commit_staged(StagedAdapter(staging, name, owner, digests[0], digests[1],
                                                     allow_base_mismatch, tenant if tenant is not None else owner))
        finally:
            staging.close()

    def _fetch_into(self, staging: StagingDir, path: str | Path) -> tuple[list[str], int]:
        if str(path).startswith("s3://"):
            from .blobs_s3 import s3_client
            from .s3_source import fetch_adapter
            return fetch_adapter(str(path), self.config.adapter_sources, staging, self.config.max_config_bytes,
                                 self.config.max_adapter_bytes, lambda: s3_client(self.config.backend_timeout_s))
        roots = self.config.allowed_register_roots
        directory = confined_adapter_dir(path, roots)
        config_src, weights_src = adapter_files(directory, roots)
        digests, total = [], 0
        for src, dst, limit in ((config_src, CONFIG_NAME, self.config.max_config_bytes),
                                (weights_src, WEIGHTS_NAME, self.config.max_adapter_bytes)):
            writer = HashingWriter(staging.file(dst))
            try:
                copy_bounded(src, writer, limit)
                digests.append(writer.finish())
                total += writer.num_bytes
            finally:
                writer.close()
        extras: dict[str, tuple[Path, int]] = {}        # staged name -> (source, byte limit)
        template = template_source(directory, roots)
        if template is not None:
            extras[template[0]] = (template[1], self.config.max_config_bytes)
        for name, src in tokenizer_sources(directory, roots):
            extras[name] = (src, self.config.max_tokenizer_bytes)
        for name, (src, limit) in extras.items():
            writer = HashingWriter(staging.file(name))
            try:
                copy_bounded(src, writer, limit)
                writer.finish()
            finally:
                writer.close()
        return digests, total

    def delete(self, ref: str, tenant: str | None, wait: bool = True, timeout_s: float | None = None) -> list[int]:
        """Delete `name` (all versions) or `name@N`; returns the versions deleted.

        They turn DELETING at once (resolve/acquire then raise AdapterNotFound); blobs and rows
        go once every lease has been released. wait=True blocks until then (or timeout_s,
        after which removal still completes in the background); wait=False returns at once.
        """
        moved, removals = self.begin_delete(ref, tenant)
        for future in removals if wait else ():
            future.result(timeout=timeout_s)
        return moved

    def begin_delete(self, ref: str, tenant: str | None) -> tuple[list[int], list[Future]]:
        """Mark for deletion without waiting: (versions, futures done once each is removed).

        For callers that must not hold a thread while leases drain (e.g. `asyncio.wrap_future`)."""
        parsed = parse_ref(ref)
        rows = [r for r in self._registry.versions_of(parsed.name) if r.visible_to(tenant) and r.state in _LIVE
                and parsed.version in (None, r.version)]
        if not rows:
            raise AdapterNotFound(f"no adapter {ref!r} to delete")
        if tenant is not None and any(r.owner is None for r in rows):
            raise PermissionDenied(_PUBLIC_WRITE.format(name=parsed.name, action="deleted"))
        self._leases.mark_deleting([r.key for r in rows])
        moved = self._registry.set_state(parsed.name, [r.version for r in rows], AdapterState.DELETING,
                                         "deleted", from_states=_LIVE)
        return moved, [self._schedule_removal(parsed.name, version) for version in moved]

    def quarantine(self, key: str, reason: str) -> None:
        """Refuse to serve `key` from now on (kept on disk for inspection; delete removes it)."""
        name, version = parse_key(key)
        if self._registry.set_state(name, [version], AdapterState.QUARANTINED, reason, (AdapterState.READY,)):
            log.error("adapter %s quarantined: %s", key, reason)
        self.cache.pop(key)

    # ---- reads -----------------------------------------------------------------------
    def resolve(self, ref: str, tenant: str | None) -> AdapterRecord:
        """`name` -> its latest READY version (latest QUARANTINED one if none is READY); `name@N` -> N.

        If the registry is unreachable, a reference resolved before whose adapter is still in
        host memory resolves as it did then (cached adapters keep serving); others raise
        StoreUnavailable."""
        parsed = parse_ref(ref)
        try:
            versions = self._registry.versions_of(parsed.name)
        except StoreUnavailable:
            with self._resolved_lock:
                remembered = self._resolved.get((ref, tenant))
            if remembered is not None and self.cache.contains(remembered.key):
                return remembered
            raise
        rows = [r for r in versions if r.visible_to(tenant) and r.state in _LIVE]
        if parsed.version is not None:
            rows = [r for r in rows if r.version == parsed.version]
        if not rows:
            raise AdapterNotFound(f"no adapter {ref!r}; list adapters to see the available ids and versions")
        record = _latest(rows)
        with self._resolved_lock:
            self._resolved[(ref, tenant)] = record
            self._resolved.move_to_end((ref, tenant))
            while len(self._resolved) > _MAX_REMEMBERED:
                self._resolved.popitem(last=False)
        return record

    def get(self, ref: str, tenant: str | None) -> tuple[AdapterRecord, list[int]]:
        """The resolved record and every live version number of its name."""
        record = self.resolve(ref, tenant)
        versions = [r.version for r in self._registry.versions_of(record.name) if r.state in _LIVE]
        return record, versions

    def list(self, tenant: str | None) -> list[AdapterRecord]:
        """One record per visible name (as `resolve(name)` gives), sorted by name."""
        by_name: dict[str, list[AdapterRecord]] = {}
        for record in self._registry.all():         # one snapshot: a concurrent delete cannot break it
            if record.visible_to(tenant) and record.state in _LIVE:
                by_name.setdefault(record.name, []).append(record)
        return [_latest(rows) for _, rows in sorted(by_name.items())]

    def list_versions(self, tenant: str | None) -> list[AdapterRecord]:
        """Every live version the tenant may see, from one registry query (sorted by name, version)."""
        return [record for record in self._registry.all() if record.visible_to(tenant) and record.state in _LIVE]

    def used_bytes(self) -> int:
        return self._registry.used_bytes()

    # ---- engine tier -----------------------------------------------------------------
    def acquire(self, key: str) -> None:
        """Lease `key` for one request; delete waits until it is released."""
        self._leases.acquire(key)

    def release(self, key: str) -> None:
        self._leases.release(key)

    def load(self, key: str) -> LoadedAdapter:
        """Host-tier adapter (blocking; loads and sha256-verifies the blob on a miss)."""
        return self._loader.load(key)

    def prefetch(self, key: str) -> Future:
        """Future[LoadedAdapter], loaded on the store's thread pool."""
        return self._loader.prefetch(key)

    def is_loaded(self, key: str) -> bool:
        return self._loader.is_loaded(key)

    def set_load_finisher(self, finish) -> None:
        """Derive serving tensors once per adapter version as it enters host memory (see
        AdapterLoader.set_finisher); the engine sets it when it is built."""
        self._loader.set_finisher(finish)

    def host_resident(self) -> tuple[str, ...]:
        """Keys of the adapters in this process's host memory (residency metrics)."""
        return self.cache.keys()

    def set_template_check(self, check: TemplateCheck | None) -> None:
        """How an adapter's chat template is test-rendered before it is stored (the engine sets it;
        None: only the size limit is checked). It raises ValueError naming what failed."""
        self._template_check = check

    def set_base_tokens(self, tokens: tuple[str, ...] | None) -> None:
        """The served base tokenizer's tokens by id (the engine sets it): an adapter with a resized
        vocabulary is checked against them at upload (None: such adapters are refused)."""
        self._base_tokens = None if tokens is None else tuple(tokens)

    def tokenizer_files(self, key: str) -> dict[str, str]:
        """The tokenizer files (name -> text) stored with adapter version `key` (a resized vocabulary);
        AdapterNotFound when it has none. The blob's sha256 is verified."""
        record = self._loadable(key)
        if not record.tokenizer_sha256:
            raise AdapterNotFound(f"adapter {key} has no tokenizer files (it uses the base model's vocabulary)")
        from .loader import read_verified

        return bundle_files(read_verified(self._blobs.read, record.tokenizer_sha256, key))

    def set_event_hook(self, on_event: EventHook | None) -> None:
        """Metrics hook for the host tier (see cache.metrics_hook)."""
        self.cache.set_hook(on_event)

    def gc(self) -> RecoveryReport:
        """Store-wide GC: finish interrupted deletions, remove every blob no row refers to (safe
        while servers use the store: blobs being written are held by the writers' lock)."""
        return collect_garbage(self._registry, self._blobs, self._stale_delete_s)

    def close(self) -> None:
        if not self._closed.is_set():
            self._closed.set()
            self._loader.close()
            self._janitor.shutdown(wait=True)
            self._backends.close()

    # ---- internals -------------------------------------------------------------------
    def _commit_staged(self, staged: StagedAdapter) -> AdapterRecord:
        files = staged.staging
        config_bytes, weights_bytes = files.file(CONFIG_NAME).read_bytes(), files.file(WEIGHTS_NAME).read_bytes()
        validated = validate_adapter(config_bytes, weights_bytes, self.base, self.config, staged.allow_base_mismatch)
        chat_template = self._staged_template(files)
        tokenizer = self._staged_tokenizer(files, validated.vocab_size)
        new = NewAdapter(chat_template=chat_template, name=staged.name, sha256=staged.weights_sha256, config_sha256=staged.config_sha256,
                         size_bytes=len(config_bytes) + len(weights_bytes) + (len(tokenizer.blob()) if tokenizer else 0),
                         dtype=validated.dtype, config=validated.config, owner=staged.owner,
                         writer_tenant=staged.writer_tenant, vocab_size=validated.vocab_size,
                         tokenizer_sha256=tokenizer.sha256 if tokenizer else None)
        digests = [staged.config_sha256, staged.weights_sha256] + ([tokenizer.sha256] if tokenizer else [])
        try:
            with self._registry.writing():
                self._blobs.put(files.file(CONFIG_NAME), staged.config_sha256)
                self._blobs.put(files.file(WEIGHTS_NAME), staged.weights_sha256)
                if tokenizer is not None:
                    bundle = files.file("tokenizer.bundle.json")
                    bundle.write_bytes(tokenizer.blob())
                    self._blobs.put(bundle, tokenizer.sha256)
                return self._registry.insert(new, self.config.quota_bytes)
        except BaseException:
            self._remove_blobs_if_unreferenced(digests)
            raise

    def _staged_tokenizer(self, files: StagingDir, vocab_size: int) -> TokenizerBundle | None:
        """The staged tokenizer files, checked, when the tables resize the vocabulary (else None)."""
        def read(name: str) -> bytes | None:
            path = files.file(name)
            return path.read_bytes() if path.exists() else None

        return staged_tokenizer(read, vocab_size, self.base.vocab_size, self._base_tokens,
                                self.config.max_tokenizer_bytes)

    def _staged_template(self, files: StagingDir) -> str | None:
        """The staged adapter's chat template (validated), or None when it carries none."""
        for name in _TEMPLATE_FILES:
            path = files.file(name)
            if path.exists():
                text = template_text(name, path.read_bytes())
                if text is not None:
                    check_template(text, name, self.config.max_chat_template_bytes, self._template_check)
                return text
        return None

    def _schedule_removal(self, name: str, version: int) -> Future:
        done: Future = Future()

        def remove() -> None:
            try:
                self._remove(name, version)
            except BaseException as error:  # noqa: BLE001 - handed to the waiter
                log.exception("removing adapter %s@%d failed", name, version)
                if done.set_running_or_notify_cancel():
                    done.set_exception(error)
                return
            if done.set_running_or_notify_cancel():      # False: the waiter gave up (cancelled)
                done.set_result(None)

        self._leases.when_idle(f"{name}@{version}", lambda: self._janitor.submit(remove))
        return done

    def _remove(self, name: str, version: int) -> None:
        record = self._registry.get(name, version)
        if record is None:
            return
        self.cache.pop(record.key)
        self._registry.delete_rows(name, [version])
        self._remove_blobs_if_unreferenced([d for d in (record.sha256, record.config_sha256, record.tokenizer_sha256)
                                            if d])
        self._leases.forget(record.key)

    def _remove_blobs_if_unreferenced(self, digests: list[str]) -> None:
        with self._registry.collecting():
            referenced = self._registry.referenced_digests()
            for digest in set(digests) - referenced:
                self._blobs.remove(digest)

    def _loadable(self, key: str) -> AdapterRecord:
        name, version = parse_key(key)
        record = self._registry.get(name, version)
        if record is None or (record.state is AdapterState.DELETING and self._leases.count(key) == 0):
            raise AdapterNotFound(f"adapter {key} was deleted")
        if record.state is AdapterState.QUARANTINED:
            raise IntegrityError(f"adapter {key} is quarantined: {record.state_reason}")
        return record

    def _staging_guard(self):
        return file_lock(self._staging_lock, exclusive=False)

    def _check_owner(self, name: str, owner: str | None, tenant: str | None) -> None:
        """Who may write a new version of `name` (docs/adapter-store.md, Tenancy).

        A taken id (public, or private to anyone but `owner`) gets one message whoever holds it;
        an existing public id takes new versions only from callers without a tenant (operators).
        """
        known, current = self._registry.name_owner(name)
        if known and current != owner:
            raise UploadConflict(TAKEN.format(name=name))
        if known and current is None and tenant is not None:
            raise PermissionDenied(_PUBLIC_WRITE.format(name=name, action="given new versions"))

    def _check_quota(self, num_bytes: int) -> None:
        used = self._registry.used_bytes()
        if used + num_bytes > self.config.quota_bytes:
            raise QuotaExceeded(f"storing {num_bytes} bytes would exceed the store quota ({used} of "
                                f"{self.config.quota_bytes} bytes used); delete unused adapters or raise "
                                f"--adapter-quota-bytes")


def _latest(rows: list[AdapterRecord]) -> AdapterRecord:
    """The latest READY version, else the latest (QUARANTINED) one; rows sorted by version."""
    ready = [r for r in rows if r.state is AdapterState.READY]
    return (ready or rows)[-1]


_TEMPLATE_FILES = (TEMPLATE_NAME, TOKENIZER_CONFIG_NAME)
TAKEN = "adapter id {name!r} is taken; choose another id"
_PUBLIC_WRITE = PUBLIC_WRITE


def _size_error(message: str) -> AdapterValidationError:
    return AdapterValidationError("size_limit", message)

"""UploadSession: assemble an adapter's two files from chunks, then commit it atomically.

Each file has a declared size and sha256. A chunk that would exceed the declared size is
refused as soon as it arrives; truncation and digest mismatches are detected at commit. Any
failure aborts the session, which removes its staging directory: nothing is left behind.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Callable

from .errors import AdapterValidationError, UploadConflict
from .adapter_template import TEMPLATE_NAME
from .adapter_tokenizer import TOKENIZER_FILES
from .paths import CONFIG_NAME, WEIGHTS_NAME
from .records import AdapterRecord
from .staging import HashingWriter, StagingDir


@dataclass(frozen=True)
class UploadMeta:
    """Declared upload: id, sizes and sha256 (hex) of both files, owner (None = public)."""

    name: str
    config_size: int
    config_sha256: str
    weights_size: int
    weights_sha256: str
    owner: str | None = None
    allow_base_mismatch: bool = False
    tenant: str | None = None            # the uploader's tenant when it differs from owner (public upload)
    chat_template_size: int = 0          # bytes of an optional chat_template.jinja (0: none)
    chat_template_sha256: str = ""
    # the adapter's tokenizer files (adapter_tokenizer.TOKENIZER_FILES), needed with a resized
    # vocabulary: (file name, size, sha256) each
    tokenizer_files: tuple[tuple[str, int, str], ...] = ()

    @property
    def tokenizer_bytes(self) -> int:
        return sum(size for _, size, _ in self.tokenizer_files)


@dataclass(frozen=True)
class StagedAdapter:
    """Both files complete, fsynced and digest-checked in a staging directory."""

    staging: StagingDir
    name: str
    owner: str | None
    config_sha256: str
    weights_sha256: str
    allow_base_mismatch: bool
    writer_tenant: str | None = None     # the writer's tenant: checked again at commit (public ids)


Committer = Callable[[StagedAdapter], AdapterRecord]


class UploadSession:
    """write(file_name, data) chunks of either file in any order, then commit() or abort()."""

    def __init__(self, meta: UploadMeta, staging: StagingDir, max_chunk_bytes: int, committer: Committer):
        self.meta = meta
        self._staging = staging
        self._max_chunk_bytes = max_chunk_bytes
        self._committer = committer
        self._declared = {CONFIG_NAME: (meta.config_size, meta.config_sha256),
                          WEIGHTS_NAME: (meta.weights_size, meta.weights_sha256)}
        if meta.chat_template_size:
            self._declared[TEMPLATE_NAME] = (meta.chat_template_size, meta.chat_template_sha256)
        for name, size, digest in meta.tokenizer_files:
            if name not in TOKENIZER_FILES or name in self._declared or size < 1:
                staging.close()
                raise AdapterValidationError("tokenizer", f"tokenizer file {name!r}: an upload may declare each of "
                                             f"{', '.join(TOKENIZER_FILES)} once, with a size of at least 1 byte")
            self._declared[name] = (size, digest)
        self._writers = {name: HashingWriter(staging.file(name)) for name in self._declared}
        self._lock = threading.Lock()
        self._finished = False

    def write(self, file_name: str, data: bytes) -> None:
        """Append a chunk (<= max_chunk_bytes) to `file_name` (adapter_config.json / adapter_model.safetensors)."""
        with self._lock:
            self._check_open()
            try:
                self._write(file_name, data)
            except BaseException:
                self._abort_locked()
                raise

    def commit(self) -> AdapterRecord:
        """Check sizes and digests, validate, store blobs and register; returns the new version."""
        with self._lock:
            self._check_open()
            try:
                self._check_complete()
                return self._committer(StagedAdapter(self._staging, self.meta.name, self.meta.owner,
                                                     self.meta.config_sha256, self.meta.weights_sha256,
                                                     self.meta.allow_base_mismatch,
                                                     self.meta.tenant if self.meta.tenant is not None
                                                     else self.meta.owner))
            finally:
                self._abort_locked()

    def abort(self) -> None:
        """Drop everything received (idempotent)."""
        with self._lock:
            self._abort_locked()

    def __enter__(self) -> UploadSession:
        return self

    def __exit__(self, *exc) -> None:
        self.abort()

    def _write(self, file_name: str, data: bytes) -> None:
        if file_name not in self._declared:
            raise AdapterValidationError("unknown_file", f"this upload carries only {sorted(self._declared)}, "
                                         f"not {file_name!r} (declare {file_name}'s size to send one)")
        if len(data) > self._max_chunk_bytes:
            raise AdapterValidationError("chunk_size", f"chunks must be at most {self._max_chunk_bytes} bytes, "
                                         f"got {len(data)}")
        writer, (declared, _) = self._writers[file_name], self._declared[file_name]
        if writer.num_bytes + len(data) > declared:
            raise AdapterValidationError("oversize", f"{file_name}: received more than the declared "
                                         f"{declared} bytes; declare the true size")
        writer.write(data)

    def _check_complete(self) -> None:
        for name, (declared, digest) in self._declared.items():
            writer = self._writers[name]
            actual = writer.finish()
            if writer.num_bytes != declared:
                raise AdapterValidationError("truncated", f"{name}: received {writer.num_bytes} of the declared "
                                             f"{declared} bytes; the upload is incomplete")
            if actual != digest.lower():
                raise AdapterValidationError("sha256_mismatch", f"{name}: sha256 of the received bytes is "
                                             f"{actual}, not the declared {digest}; the file was corrupted in "
                                             f"transit or the declaration is wrong")

    def _check_open(self) -> None:
        if self._finished:
            raise UploadConflict("this upload session is already committed or aborted; start a new upload")

    def _abort_locked(self) -> None:
        if not self._finished:
            self._finished = True
            try:
                for writer in self._writers.values():
                    with contextlib.suppress(OSError):   # e.g. ENOSPC flushing buffered bytes we drop anyway
                        writer.close()
            finally:
                self._staging.close()

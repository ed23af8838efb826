"""Registration from server-local paths, confined to the configured allowed roots."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from .errors import AdapterValidationError, PermissionDenied
from .staging import HashingWriter

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
_COPY_CHUNK = 1 << 20


def confined_adapter_dir(path: str | os.PathLike, allowed_roots: tuple[str, ...]) -> Path:
    """The real path of `path` if it is a directory inside an allowed root (after realpath)."""
    if not allowed_roots:
        raise PermissionDenied("registration from server paths is disabled: no allowed register roots are "
                               "configured (start the server with --allowed-register-root DIR)")
    text = os.fspath(path)
    if not text or "\x00" in text:
        raise PermissionDenied("the register path is empty or contains a NUL byte")
    if ".." in Path(text).parts:
        raise PermissionDenied(f"the register path {text!r} contains '..'; give a path inside an allowed root")
    roots = [Path(os.path.realpath(root)) for root in allowed_roots]
    candidates = [Path(text)] if os.path.isabs(text) else [root / text for root in roots]
    for candidate in candidates:
        real = Path(os.path.realpath(candidate))
        if not _inside_any(real, roots):
            continue
        if not real.is_dir():
            raise AdapterValidationError("missing_file", f"{text!r} is not a directory; give the PEFT adapter "
                                         f"directory holding {CONFIG_NAME} and {WEIGHTS_NAME}")
        return real
    # The roots themselves are not named: a caller learns only that its own path is outside.
    raise PermissionDenied(f"the register path {text!r} resolves outside the allowed register roots "
                           "(--allowed-register-root; symlinks are followed before checking)")


def adapter_files(directory: Path, allowed_roots: tuple[str, ...]) -> tuple[Path, Path]:
    """(config, weights) real paths inside `directory`, each confined to the allowed roots."""
    roots = [Path(os.path.realpath(root)) for root in allowed_roots]
    weights = directory / WEIGHTS_NAME
    if not weights.exists():
        pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise AdapterValidationError("pickle_format", f"{directory} holds only pickle weights {pickles}; "
                                         f"loraplex never unpickles. Re-save with safetensors "
                                         f"(save_pretrained(..., safe_serialization=True))")
        raise AdapterValidationError("missing_file", f"{directory} has no {WEIGHTS_NAME}")
    if not (directory / CONFIG_NAME).exists():
        raise AdapterValidationError("missing_file", f"{directory} has no {CONFIG_NAME}")
    files = []
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        real = Path(os.path.realpath(directory / name))
        if not _inside_any(real, roots):
            raise PermissionDenied(f"{name} is a symlink to a file outside the allowed register roots; "
                                   f"copy the file into the adapter directory instead")
        files.append(real)
    return files[0], files[1]


def copy_bounded(source: Path, writer: HashingWriter, max_bytes: int) -> None:
    """Copy a regular file (not following a final symlink) into `writer`, refusing > max_bytes.

    O_NONBLOCK: opening a FIFO (or a device) must not wait for a writer; it is refused below."""
    fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as file:
        if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
            raise AdapterValidationError("missing_file", f"{source.name} is not a regular file (a FIFO, device or socket); "
                                         f"copy the real file into the adapter directory")
        while chunk := file.read(_COPY_CHUNK):
            if writer.num_bytes + len(chunk) > max_bytes:
                raise AdapterValidationError("size_limit", f"{source} is larger than the limit of {max_bytes} "
                                             f"bytes; raise --max-adapter-bytes or use a smaller adapter")
            writer.write(chunk)


def _inside_any(real: Path, roots: list[Path]) -> bool:
    return any(real == root or root in real.parents for root in roots)

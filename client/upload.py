"""Adapter upload, client side: validate a local PEFT directory, hash it, and chunk it.

Validation fails fast with a ValidationError naming the file and what to fix, before any byte
is sent: both files present, adapter_config.json is JSON with peft_type LORA and a positive r,
and the safetensors header parses with tensor extents inside the file.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from ..adapters_store.strict_json import StrictJsonError, loads_strict
from ..v1 import adapters_pb2 as pb
from .errors import ValidationError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
CHUNK_BYTES = 2**20                      # the server's per-chunk limit
MAX_HEADER_BYTES = 100 * 2**20           # as in the safetensors reference implementation
_READ_BYTES = 2**20


@dataclass(frozen=True)
class LocalFile:
    path: Path
    kind: int                            # pb.ADAPTER_FILE_CONFIG or pb.ADAPTER_FILE_WEIGHTS
    size: int
    sha256: str


@dataclass(frozen=True)
class LocalAdapter:
    """A validated PEFT LoRA directory, ready to upload."""

    directory: Path
    config: LocalFile
    weights: LocalFile
    rank: int
    chat_template: bytes | None = None   # chat_template.jinja, or tokenizer_config.json's chat_template
    tokenizer: tuple[LocalFile, ...] = ()   # tokenizer files, sent when modules_to_save has vocab tables

    @property
    def total_bytes(self) -> int:
        return (self.config.size + self.weights.size + len(self.chat_template or b"")
                + sum(f.size for f in self.tokenizer))


def _fail(directory: Path, field: str, problem: str) -> ValidationError:
    return ValidationError(f"{directory} is not a valid PEFT LoRA adapter: {field}: {problem}",
                           violations={field: problem})


def read_config(directory: Path) -> dict:
    """Parse and check adapter_config.json (peft_type LORA, positive integer r)."""
    try:
        config = loads_strict((directory / CONFIG_NAME).read_bytes())
    except StrictJsonError as error:
        raise _fail(directory, CONFIG_NAME, f"not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise _fail(directory, CONFIG_NAME, "must hold a JSON object")
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise _fail(directory, f"{CONFIG_NAME}:peft_type",
                    f"is {config.get('peft_type')!r}; only LORA adapters can be served")
    rank = config.get("r")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise _fail(directory, f"{CONFIG_NAME}:r", f"is {rank!r}; the LoRA rank must be a positive integer")
    return config


def check_safetensors(directory: Path) -> int:
    """Parse the safetensors header; returns the number of tensors."""
    path = directory / WEIGHTS_NAME
    size = path.stat().st_size
    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise _fail(directory, WEIGHTS_NAME, f"only {size} bytes; too short for a safetensors header")
        (header_bytes,) = struct.unpack("<Q", prefix)
        if header_bytes > min(MAX_HEADER_BYTES, size - 8):
            raise _fail(directory, WEIGHTS_NAME, f"header length {header_bytes} is larger than the file")
        try:
            header = loads_strict(handle.read(header_bytes))
        except StrictJsonError as error:
            raise _fail(directory, WEIGHTS_NAME, f"header is not JSON ({error}); is this a safetensors file?") from None
    if not isinstance(header, dict):
        raise _fail(directory, WEIGHTS_NAME, "header must be a JSON object")
    tensors = {name: entry for name, entry in header.items() if name != "__metadata__"}
    if not tensors:
        raise _fail(directory, WEIGHTS_NAME, "holds no tensors")
    data_bytes = size - 8 - header_bytes
    for name, entry in tensors.items():
        if not _well_formed(entry, data_bytes):
            raise _fail(directory, WEIGHTS_NAME, f"tensor {name!r} has a malformed entry or lies outside the file")
    return len(tensors)


def _well_formed(entry: object, data_bytes: int) -> bool:
    """dtype a string, shape a list of counts, data_offsets two counts inside the data section."""
    if not isinstance(entry, dict):
        return False
    offsets, shape = entry.get("data_offsets"), entry.get("shape")
    if not isinstance(entry.get("dtype"), str) or not isinstance(shape, list) or not isinstance(offsets, list):
        return False
    if len(offsets) != 2 or not all(_is_count(v) for v in shape + offsets):
        return False
    return offsets[0] <= offsets[1] <= data_bytes


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(_READ_BYTES):
            digest.update(block)
    return digest.hexdigest()


def validate_adapter_dir(path: str | Path) -> LocalAdapter:
    """Check a local PEFT LoRA directory and hash its two files; raises ValidationError."""
    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise _fail(directory, "path", "not a directory (give the folder PEFT's save_pretrained wrote)")
    missing = [name for name in (CONFIG_NAME, WEIGHTS_NAME) if not (directory / name).is_file()]
    if missing:
        hint = " (save with safe_serialization=True)" if WEIGHTS_NAME in missing else ""
        raise _fail(directory, missing[0], f"missing{hint}")
    try:
        config = read_config(directory)
        check_safetensors(directory)
        files = [LocalFile(directory / name, kind, (directory / name).stat().st_size, sha256_of(directory / name))
                 for name, kind in ((CONFIG_NAME, pb.ADAPTER_FILE_CONFIG), (WEIGHTS_NAME, pb.ADAPTER_FILE_WEIGHTS))]
    except OSError as error:
        raise _fail(directory, "path", f"cannot read it ({error.strerror or error})") from None
    return LocalAdapter(directory, files[0], files[1], rank=config["r"], chat_template=read_chat_template(directory),
                        tokenizer=tokenizer_files(directory, config))


TOKENIZER_FILES = (("tokenizer.json", pb.ADAPTER_FILE_TOKENIZER),
                   ("tokenizer_config.json", pb.ADAPTER_FILE_TOKENIZER_CONFIG),
                   ("special_tokens_map.json", pb.ADAPTER_FILE_SPECIAL_TOKENS_MAP))


def tokenizer_files(directory: Path, config: dict) -> tuple[LocalFile, ...]:
    """The tokenizer files to send: only when modules_to_save saves embed_tokens or lm_head (a
    resized vocabulary needs the adapter's own tokenizer; the server keeps them only then)."""
    saved = config.get("modules_to_save") or ()
    if not any(name in ("embed_tokens", "lm_head") for name in (saved if isinstance(saved, list) else ())):
        return ()
    return tuple(LocalFile(directory / name, kind, (directory / name).stat().st_size, sha256_of(directory / name))
                 for name, kind in TOKENIZER_FILES if (directory / name).is_file())


def read_chat_template(directory: Path) -> bytes | None:
    """The adapter's own chat template (chat_template.jinja, else tokenizer_config.json's string
    `chat_template`), as UTF-8 bytes; None when it has none. The server validates it."""
    if (directory / "chat_template.jinja").is_file():
        return (directory / "chat_template.jinja").read_bytes()
    if not (directory / "tokenizer_config.json").is_file():
        return None
    try:
        value = json.loads((directory / "tokenizer_config.json").read_text("utf-8")).get("chat_template")
    except (ValueError, AttributeError):
        raise _fail(directory, "tokenizer_config.json", "not a valid JSON object") from None
    if isinstance(value, list):
        value = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}.get("default")
    return value.encode("utf-8") if isinstance(value, str) and value else None


def upload_metadata(adapter: LocalAdapter, adapter_id: str, private: bool,
                    allow_base_mismatch: bool) -> pb.UploadAdapterRequest:
    return pb.UploadAdapterRequest(metadata=pb.UploadMetadata(
        adapter_id=adapter_id, config_size=adapter.config.size, config_sha256=adapter.config.sha256,
        weights_size=adapter.weights.size, weights_sha256=adapter.weights.sha256, private=private,
        allow_base_mismatch=allow_base_mismatch, chat_template_size=len(adapter.chat_template or b""),
        chat_template_sha256=hashlib.sha256(adapter.chat_template).hexdigest() if adapter.chat_template else "",
        tokenizer_files=[pb.DeclaredFile(file=f.kind, size=f.size, sha256=f.sha256) for f in adapter.tokenizer]))


def upload_requests(adapter: LocalAdapter, adapter_id: str, private: bool = False,
                    allow_base_mismatch: bool = False, progress: Callable[[int, int], None] | None = None,
                    chunk_bytes: int = CHUNK_BYTES) -> Iterator[pb.UploadAdapterRequest]:
    """The UploadAdapter stream: metadata, then chunks of <= `chunk_bytes`; `progress(sent, total)`
    is called after each chunk is handed to gRPC."""
    yield upload_metadata(adapter, adapter_id, private, allow_base_mismatch)
    sent, total = 0, adapter.total_bytes
    for local in (adapter.config, adapter.weights, *adapter.tokenizer):
        with local.path.open("rb") as handle:
            while data := handle.read(chunk_bytes):
                yield pb.UploadAdapterRequest(chunk=pb.UploadChunk(file=local.kind, data=data))
                sent += len(data)
                if progress is not None:
                    progress(sent, total)
    template = adapter.chat_template or b""
    for start in range(0, len(template), chunk_bytes):
        data = template[start:start + chunk_bytes]
        yield pb.UploadAdapterRequest(chunk=pb.UploadChunk(file=pb.ADAPTER_FILE_CHAT_TEMPLATE, data=data))
        sent += len(data)
        if progress is not None:
            progress(sent, total)


def progress_bar(total: int, label: str) -> tuple[Callable[[int, int], None], Callable[[], None]]:
    """A tqdm bar on stderr: (callback(sent, total), close)."""
    from tqdm import tqdm

    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=label)

    def update(sent: int, _total: int) -> None:
        bar.update(sent - bar.n)

    return update, bar.close


def combine(*callbacks: Callable[[int, int], None] | None) -> Callable[[int, int], None] | None:
    present = [callback for callback in callbacks if callback is not None]
    if not present:
        return None

    def call_all(sent: int, total: int) -> None:
        for callback in present:
            callback(sent, total)

    return call_all

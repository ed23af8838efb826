"""Parse and check a safetensors file's header without trusting it (and never unpickling).

Layout: 8-byte little-endian header length N, N bytes of JSON, then the tensor data. Every
tensor's `data_offsets` must lie inside the data region, match its dtype and shape, and the
tensors must tile the region exactly (a truncated or padded file is refused).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

from .errors import AdapterValidationError
from .strict_json import StrictJsonError, loads_strict

DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
_PICKLE_PROTOCOL_MAGIC = tuple(bytes([0x80, proto]) for proto in range(2, 6))
_ZIP_MAGIC = b"PK\x03\x04"


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as the header describes it; begin/end are offsets into the data region."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def pickle_kind(data: bytes) -> str | None:
    """"a pickle stream" (protocol 2-5), "a torch.save zip archive" (holds a pickle), or None."""
    if data[8:9] == b"{":
        return None                                     # a safetensors JSON header starts here
    if data[:2] in _PICKLE_PROTOCOL_MAGIC:
        return "a pickle stream"
    return "a torch.save zip archive" if data[:4] == _ZIP_MAGIC else None


def parse_header(data: bytes, max_header_bytes: int) -> list[TensorEntry]:
    """Entries of a safetensors file's header, checked against the file's length."""
    kind = pickle_kind(data)
    if kind is not None:
        raise AdapterValidationError("pickle_format", f"the weights file is {kind}; loraplex never "
                                     "unpickles. Save the adapter with safetensors "
                                     "(PEFT: save_pretrained(..., safe_serialization=True))")
    if len(data) < 8:
        raise AdapterValidationError("truncated", f"the weights file is {len(data)} bytes, shorter than the "
                                     f"8-byte safetensors header length; upload the complete file")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > max_header_bytes:
        raise AdapterValidationError("header_size", f"the safetensors header claims {header_len} bytes, above "
                                     f"the limit of {max_header_bytes}; this is not a normal adapter file")
    if 8 + header_len > len(data):
        raise AdapterValidationError("truncated", f"the safetensors header needs {header_len} bytes but the "
                                     f"file ends after {len(data) - 8}; the file is truncated")
    header = _decode_header(data[8:8 + header_len])
    entries = [_entry(name, value) for name, value in header.items() if name != "__metadata__"]
    _check_tiling(entries, len(data) - 8 - header_len)
    return entries


def _decode_header(raw: bytes) -> dict:
    try:
        header = loads_strict(raw)
    except StrictJsonError as error:
        if error.duplicate_key_at_top is not None:
            raise AdapterValidationError("duplicate_tensor", f"the safetensors header names tensor "
                                         f"{error.duplicate_key_at_top!r} twice; the file is corrupted") from None
        raise AdapterValidationError("header_json", f"the safetensors header is not valid UTF-8 JSON ({error}); "
                                     f"the file is not a safetensors file or is corrupted") from None
    if not isinstance(header, dict):
        raise AdapterValidationError("header_json", "the safetensors header must be a JSON object")
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise AdapterValidationError("header_json", "safetensors __metadata__ must map strings to strings")
    return header


def _entry(name: str, value: object) -> TensorEntry:
    bad = AdapterValidationError("header_json", f"tensor {name!r} in the safetensors header must have "
                                 f"'dtype', 'shape' (list of ints >= 0) and 'data_offsets' ([begin, end])")
    if not isinstance(value, dict):
        raise bad
    extra = sorted(set(value) - {"dtype", "shape", "data_offsets"})
    if extra:
        raise AdapterValidationError("header_json", f"tensor {name!r} in the safetensors header has unknown "
                                     f"field(s) {', '.join(map(repr, extra))}; an entry holds only 'dtype', "
                                     f"'shape' and 'data_offsets'")
    dtype, shape, offsets = value.get("dtype"), value.get("shape"), value.get("data_offsets")
    if (not isinstance(dtype, str) or not isinstance(shape, list) or not isinstance(offsets, list)
            or len(offsets) != 2 or not all(_is_count(x) for x in shape + offsets)):
        raise bad
    if dtype not in DTYPE_BYTES:
        raise AdapterValidationError("dtype", f"tensor {name!r} has unknown dtype {dtype!r}")
    begin, end = offsets
    if end < begin or end - begin != math.prod(shape) * DTYPE_BYTES[dtype]:
        raise AdapterValidationError("tensor_offsets", f"tensor {name!r}: data_offsets {offsets} do not match "
                                     f"its {dtype} shape {shape}; the file is corrupted")
    return TensorEntry(name, dtype, tuple(shape), begin, end)


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_tiling(entries: list[TensorEntry], data_len: int) -> None:
    position = 0
    for entry in sorted(entries, key=lambda e: (e.begin, e.end)):
        if entry.end > data_len:
            raise AdapterValidationError("truncated", f"tensor {entry.name!r} ends at byte {entry.end} of the "
                                         f"data section but the file holds only {data_len}; the file is truncated")
        if entry.begin != position:
            raise AdapterValidationError("tensor_offsets", f"tensor {entry.name!r} starts at {entry.begin}, "
                                         f"expected {position} (tensors overlap or leave gaps); corrupted file")
        position = entry.end
    if position != data_len:
        raise AdapterValidationError("tensor_offsets", f"{data_len - position} bytes after the last tensor; "
                                     f"the file is corrupted or padded")

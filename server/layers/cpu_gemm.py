"""Prepacked oneDNN GEMM for dense linear layers on x86 CPUs (float32 and bfloat16).

`F.linear` on CPU goes through MKL's sgemm, which on AMD processors runs its AVX2 code path;
oneDNN picks its kernel from the instruction set (AVX-512 where present) and, with the weight
reordered once into its blocked layout, runs the small-M GEMMs of decoding about 3x faster on
the 2-core EPYC this project is measured on (see BENCHMARKS.md). The arithmetic is the same
float32 (or bfloat16) dot products; only the summation order differs, so results agree with
`F.linear` to float rounding (~1e-6 relative).

`packed_linear` and its reference twin `packed_linear_ref` share one signature; the twin is
plain `F.linear` on the unpacked weight. tests/unit/test_cpu_gemm.py compares them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .options import LINEAR_KERNEL_CHOICES
_PACKABLE_DTYPES = (torch.float32, torch.bfloat16)
_BATCH_HINT = 16        # oneDNN's layout choice barely depends on it (measured at M = 1..512)


# The op's overload resolved once at import (calling the packet resolves it every call).
_linear_pointwise = (torch.ops.mkldnn._linear_pointwise.default
                     if hasattr(torch.ops.mkldnn, "_linear_pointwise") else None)


def onednn_supported(dtype: torch.dtype, device: str | torch.device) -> bool:
    """True when this torch build and CPU can run prepacked oneDNN linears for dtype on device.

    bfloat16 also needs the CPU's support (AVX-512 BW/VL/DQ or AVX-NE-CONVERT): an AVX2-only
    processor such as many AMD EPYCs has none, and oneDNN refuses the reorder there.
    """
    ops_present = (torch.device(device).type == "cpu" and dtype in _PACKABLE_DTYPES
                   and torch.backends.mkldnn.is_available()
                   and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
                   and hasattr(torch.ops.mkldnn, "_linear_pointwise"))
    if not ops_present or dtype != torch.bfloat16:
        return ops_present
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def use_onednn(kernel: str, dtype: torch.dtype, device: str | torch.device) -> bool:
    """Resolve a --linear-kernel choice; 'onednn' where unsupported is an error, not a fallback."""
    if kernel not in LINEAR_KERNEL_CHOICES:
        raise ValueError(f"linear kernel {kernel!r}; choose one of {', '.join(LINEAR_KERNEL_CHOICES)}")
    if kernel in ("aten", "library"):     # "library" on a dense layer: F.linear, torch's own
        return False
    supported = onednn_supported(dtype, device)
    if kernel == "onednn" and not supported:
        raise ValueError(f"--linear-kernel onednn needs a CPU device, dtype float32 or bfloat16 and a "
                         f"torch build with oneDNN (got device={device}, dtype={dtype}); use auto or aten")
    return supported


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """[out, in] dense weight -> the same weight as an opaque oneDNN tensor in blocked layout."""
    with torch.no_grad():
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), _BATCH_HINT)


def unpack_weight(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_weight (exact): [out, in] dense tensor."""
    return packed.to_dense()


def row_bucket(num_rows: int) -> int:
    """Rows a packed GEMM runs with: exact up to 8, then multiples of 8 up to 64, then of 64.

    oneDNN (and PyTorch's ideep layer above it) cache one primitive per input shape, each
    holding memory: with every batch size of a serving loop distinct, a soak test grew the
    process by 200+ MiB. Rounding the row count up to a bucket bounds the distinct shapes (46
    per weight up to 2048 rows) at <= 1/8 of padding waste past 64 rows, none for decode
    batches of a multiple of 8.
    """
    if num_rows <= 8:
        return num_rows
    if num_rows <= 64:
        return -(-num_rows // 8) * 8
    return -(-num_rows // 64) * 64


def packed_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [T, in] @ weight^T + bias -> [T, out]; weight from pack_weight."""
    num_rows = x.shape[0]
    rows = row_bucket(num_rows)
    if rows == num_rows:
        return _linear_pointwise(x, weight, bias, "none", [], "")
    x = F.pad(x, (0, 0, 0, rows - num_rows))                               # [rows, in], zero rows
    return _linear_pointwise(x, weight, bias, "none", [], "")[:num_rows]


def packed_linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Reference twin of packed_linear: weight is the plain [out, in] tensor."""
    return F.linear(x, weight, bias)

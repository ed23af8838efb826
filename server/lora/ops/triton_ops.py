"""Triton SGMV/BGMV kernels (CUDA) with the reference's signatures.

One segmented GEMM kernel serves both directions: each program takes a tile of one segment's
rows (all tokens of a segment share a slot) and multiplies it by that slot's matrix.
shrink: h[rows] = x[rows] @ A[slot]^T              (K = in_features, N = Ra)
expand: y[rows, cols] += scale[slot] * h[rows] @ B^T[slot]   (K = R, N = out_m)
BGMV is the same kernel over one-token segments. Accumulation is float32; float32 inputs use
IEEE dot products (no TF32), so results match the reference to float32 rounding.
Imported only when CUDA and triton are present (see ops.select_ops), and by the tests under
Triton's interpreter (TRITON_INTERPRET=1, tests/triton_cases.py). The per-step path
(prepare, add_delta) reads nothing back from the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..batch_info import LoraBatchInfo
from ..delta import LoraStep, ProjLoraWeights


@triton.jit
def _sgmv_kernel(x_ptr, w_ptr, out_ptr, scale_ptr, seg_starts_ptr, seg_lens_ptr, seg_slots_ptr,
                 K, N, stride_xm, stride_xk, stride_ws, stride_wk, stride_wn, stride_om, stride_on,
                 ACCUMULATE: tl.constexpr, HAS_SCALE: tl.constexpr, IEEE: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    seg = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_n = tl.program_id(2)
    slot = tl.load(seg_slots_ptr + seg)
    length = tl.load(seg_lens_ptr + seg)
    if (slot >= 0) & (pid_m * BLOCK_M < length):
        start = tl.load(seg_starts_ptr + seg)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        m_mask = offs_m < length
        n_mask = offs_n < N
        rows = (start + offs_m).to(tl.int64)
        w_base = w_ptr + slot.to(tl.int64) * stride_ws
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + offs_k
            k_mask = k < K
            x_tile = tl.load(x_ptr + rows[:, None] * stride_xm + k[None, :] * stride_xk,
                             mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            w_tile = tl.load(w_base + k[:, None] * stride_wk + offs_n[None, :] * stride_wn,
                             mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            if IEEE:
                acc += tl.dot(x_tile, w_tile, input_precision="ieee")
            else:
                acc += tl.dot(x_tile, w_tile)
        if HAS_SCALE:
            acc = acc * tl.load(scale_ptr + slot).to(tl.float32)
        out_ptrs = out_ptr + rows[:, None] * stride_om + offs_n[None, :] * stride_on
        out_mask = m_mask[:, None] & n_mask[None, :]
        if ACCUMULATE:
            acc += tl.load(out_ptrs, mask=out_mask, other=0.0).to(tl.float32)
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


@dataclass(frozen=True)
class Segments:
    """Routing as device segments plus the longest segment (host int, for the grid)."""

    starts: torch.Tensor
    lens: torch.Tensor
    slots: torch.Tensor
    max_len: int


def _segments(seg_starts: torch.Tensor, seg_lens: torch.Tensor, seg_slots: torch.Tensor,
              device: torch.device, max_len: int | None = None) -> Segments:
    """max_len None: read it from seg_lens (a host sync on CUDA; the standalone sgmv_* calls)."""
    lens = seg_lens.to(device=device, dtype=torch.int64)
    if max_len is None:
        max_len = int(lens.max()) if lens.numel() else 0
    return Segments(seg_starts.to(device=device, dtype=torch.int64), lens,
                    seg_slots.to(device=device, dtype=torch.int64), max_len)


def _per_token(token_slots: torch.Tensor) -> Segments:
    num_tokens = token_slots.numel()
    starts = torch.arange(num_tokens, device=token_slots.device, dtype=torch.int64)
    return Segments(starts, torch.ones_like(starts), token_slots.to(torch.int64), 1 if num_tokens else 0)


def _launch(x: torch.Tensor, w: torch.Tensor, w_strides: tuple[int, int, int], out: torch.Tensor,
            segs: Segments, k: int, n: int, scales: torch.Tensor | None, accumulate: bool) -> None:
    """out[rows, :n] (+)= (scale *) x[rows, :k] @ W[slot] for every segment, W[slot][k, n]."""
    if segs.max_len == 0 or n == 0:
        return
    block_m = 16 if segs.max_len <= 16 else 64
    block_n = 32 if n <= 32 else 64
    block_k = 32 if k >= 32 else 16
    grid = (segs.slots.numel(), triton.cdiv(segs.max_len, block_m), triton.cdiv(n, block_n))
    _sgmv_kernel[grid](
        x, w, out, scales if scales is not None else out, segs.starts, segs.lens, segs.slots,
        k, n, x.stride(0), x.stride(1), w_strides[0], w_strides[1], w_strides[2],
        out.stride(0), out.stride(1),
        ACCUMULATE=accumulate, HAS_SCALE=scales is not None, IEEE=x.dtype == torch.float32,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)


def _shrink(x: torch.Tensor, a: torch.Tensor, segs: Segments) -> torch.Tensor:
    """x [T, in], a [S, Ra, in] -> h [T, Ra] (float32 accumulate, stored in a's dtype)."""
    x = x.to(a.dtype)
    h = torch.zeros(x.shape[0], a.shape[1], dtype=a.dtype, device=x.device)
    _launch(x, a, (a.stride(0), a.stride(2), a.stride(1)), h, segs, a.shape[2], a.shape[1], None, False)
    return h


def _expand(h: torch.Tensor, bt: torch.Tensor, segs: Segments, scales: torch.Tensor,
            y: torch.Tensor, col_start: int) -> None:
    """h [T, R], bt [S, R, out_m]: y[rows, col_start:col_start+out_m] += scale * h @ bt[slot]."""
    if h.shape[-1] != bt.shape[1]:
        raise ValueError(f"h has rank {h.shape[-1]} but the B stack has rank {bt.shape[1]}")
    out_m = bt.shape[-1]
    target = y[:, col_start:col_start + out_m]
    _launch(h.to(bt.dtype), bt, (bt.stride(0), bt.stride(1), bt.stride(2)), target, segs,
            bt.shape[1], out_m, scales.to(bt.dtype), True)


class TritonOps:
    """CUDA backend: segmented GEMM kernels for both shrink and expand."""

    name = "triton"

    def bgmv_shrink(self, x: torch.Tensor, a: torch.Tensor, token_slots: torch.Tensor) -> torch.Tensor:
        return _shrink(x, a, _per_token(token_slots))

    def bgmv_expand(self, h: torch.Tensor, bt: torch.Tensor, token_slots: torch.Tensor,
                    scales: torch.Tensor, y: torch.Tensor, col_start: int) -> None:
        _expand(h, bt, _per_token(token_slots), scales, y, col_start)

    def sgmv_shrink(self, x: torch.Tensor, a: torch.Tensor, seg_starts: torch.Tensor,
                    seg_lens: torch.Tensor, seg_slots: torch.Tensor) -> torch.Tensor:
        return _shrink(x, a, _segments(seg_starts, seg_lens, seg_slots, x.device))

    def sgmv_expand(self, h: torch.Tensor, bt: torch.Tensor, seg_starts: torch.Tensor,
                    seg_lens: torch.Tensor, seg_slots: torch.Tensor, scales: torch.Tensor,
                    y: torch.Tensor, col_start: int) -> None:
        _expand(h, bt, _segments(seg_starts, seg_lens, seg_slots, h.device), scales, y, col_start)

    def prepare(self, info: LoraBatchInfo, scales: torch.Tensor) -> LoraStep:
        """Segments on the device; the grid's longest segment from the host (no sync)."""
        segs = _segments(info.seg_starts, info.seg_lens, info.seg_slots, scales.device,
                         info.max_seg_len)
        return LoraStep(info=info, scales=scales, plan=segs)

    def add_delta(self, x: torch.Tensor, y: torch.Tensor, weights: ProjLoraWeights, step: LoraStep) -> None:
        segs: Segments = step.plan
        rank = weights.rank
        h = _shrink(x, weights.a, segs)                                     # [T, subs * R]
        for m, (bt, col_start) in enumerate(zip(weights.bts, weights.col_starts)):
            _expand(h[:, m * rank:(m + 1) * rank], bt, segs, step.scales, y, col_start)

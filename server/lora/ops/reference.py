"""Multi-LoRA semantics, written once in plain torch (the twin every fast backend is tested against).

For each token t whose slot s = token_slots[t] >= 0 and each sub-module m of a projection:
    y[t, cols(m)] += scale[s] * (x[t] @ A[s, m]^T) @ B[s, m]^T
Tokens with slot -1 get nothing. Math runs in the adapter dtype (x is cast to it); the delta
is cast to y's dtype when added.

BGMV = one adapter per token (decode view); SGMV = one adapter per segment of consecutive
tokens (prefill view). Both compute the same thing; they differ in how routing is given.
"""

from __future__ import annotations

import torch

from ..batch_info import LoraBatchInfo
from ..delta import LoraStep, ProjLoraWeights


def bgmv_shrink(x: torch.Tensor, a: torch.Tensor, token_slots: torch.Tensor) -> torch.Tensor:
    """x [T, in], a [S, Ra, in], token_slots [T] -> h [T, Ra]: h[t] = A[s_t] @ x[t] (0 if s_t = -1)."""
    x = x.to(a.dtype)
    valid = token_slots >= 0                                            # [T]
    gathered = a.index_select(0, token_slots.clamp(min=0))              # [T, Ra, in]
    h = torch.bmm(gathered, x.unsqueeze(-1)).squeeze(-1)                # [T, Ra]
    return h * valid.unsqueeze(-1).to(h.dtype)


def bgmv_expand(h: torch.Tensor, bt: torch.Tensor, token_slots: torch.Tensor, scales: torch.Tensor,
                y: torch.Tensor, col_start: int) -> None:
    """h [T, R], bt [S, R, out_m], scales [S]; y[t, col_start:col_start+out_m] += scale[s_t] * h[t] @ bt[s_t]."""
    _check_rank(h, bt)
    safe = token_slots.clamp(min=0)
    gathered = bt.index_select(0, safe)                                 # [T, R, out_m]
    delta = torch.bmm(h.to(bt.dtype).unsqueeze(1), gathered).squeeze(1)  # [T, out_m]
    weight = scales.index_select(0, safe) * (token_slots >= 0).to(scales.dtype)   # [T]
    delta = delta * weight.unsqueeze(-1)
    y[:, col_start:col_start + bt.shape[-1]] += delta.to(y.dtype)


def sgmv_shrink(x: torch.Tensor, a: torch.Tensor, seg_starts: torch.Tensor, seg_lens: torch.Tensor,
                seg_slots: torch.Tensor) -> torch.Tensor:
    """x [T, in], a [S, Ra, in], segments [num_segments] -> h [T, Ra]; rows of slot -1 segments are 0."""
    x = x.to(a.dtype)
    h = x.new_zeros(x.shape[0], a.shape[1])
    for start, length, slot in zip(seg_starts.tolist(), seg_lens.tolist(), seg_slots.tolist()):
        if slot >= 0:
            h[start:start + length] = x[start:start + length] @ a[slot].T     # [len, Ra]
    return h


def sgmv_expand(h: torch.Tensor, bt: torch.Tensor, seg_starts: torch.Tensor, seg_lens: torch.Tensor,
                seg_slots: torch.Tensor, scales: torch.Tensor, y: torch.Tensor, col_start: int) -> None:
    """h [T, R], bt [S, R, out_m]; for each segment y[rows, cols] += scale[s] * h[rows] @ bt[s]."""
    _check_rank(h, bt)
    h = h.to(bt.dtype)
    cols = slice(col_start, col_start + bt.shape[-1])
    for start, length, slot in zip(seg_starts.tolist(), seg_lens.tolist(), seg_slots.tolist()):
        if slot >= 0:
            rows = slice(start, start + length)
            y[rows, cols] += (scales[slot] * (h[rows] @ bt[slot])).to(y.dtype)


def lora_bgmv_ref(x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, bts: list[torch.Tensor],
               col_starts: list[int], token_slots: torch.Tensor, scales: torch.Tensor) -> None:
    """One projection's whole delta, one adapter per token: bgmv_shrink, then bgmv_expand per
    sub-module m into columns col_starts[m]. The twin of the fused native kernel `lora_bgmv`
    (server/kernels/csrc/lora.cpp), same signature. a [S, subs * R, in], bts[m] [S, R, out_m].
    Half-precision adapter weights are widened to x's dtype first (the kernel's float32 sums)."""
    rank = a.shape[1] // len(bts)
    if a.dtype != x.dtype:
        a, bts = a.to(x.dtype), [bt.to(x.dtype) for bt in bts]
    h = bgmv_shrink(x, a, token_slots)                                  # [T, subs * R]
    for m, (bt, col_start) in enumerate(zip(bts, col_starts)):
        bgmv_expand(h[:, m * rank:(m + 1) * rank], bt, token_slots, scales, y, col_start)


def prepare(info: LoraBatchInfo, scales: torch.Tensor) -> LoraStep:
    return LoraStep(info=info, scales=scales)


def add_delta(x: torch.Tensor, y: torch.Tensor, weights: ProjLoraWeights, step: LoraStep) -> None:
    """y [T, out] += the delta of every sub-module of one projection (SGMV routing)."""
    info, rank = step.info, weights.rank
    h = sgmv_shrink(x, weights.a, info.seg_starts, info.seg_lens, info.seg_slots)   # [T, subs * rank]
    for m, (bt, col_start) in enumerate(zip(weights.bts, weights.col_starts)):
        sgmv_expand(h[:, m * rank:(m + 1) * rank], bt, info.seg_starts, info.seg_lens,
                    info.seg_slots, step.scales, y, col_start)


def _check_rank(h: torch.Tensor, bt: torch.Tensor) -> None:
    if h.shape[-1] != bt.shape[1]:
        raise ValueError(f"h has rank {h.shape[-1]} but the B stack has rank {bt.shape[1]}")


class ReferenceOps:
    """The pure-torch reference as an ops object (same interface as the fast backends)."""

    name = "reference"
    bgmv_shrink = staticmethod(bgmv_shrink)
    bgmv_expand = staticmethod(bgmv_expand)
    sgmv_shrink = staticmethod(sgmv_shrink)
    sgmv_expand = staticmethod(sgmv_expand)
    prepare = staticmethod(prepare)
    add_delta = staticmethod(add_delta)

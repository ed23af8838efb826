"""Fast multi-LoRA delta in plain torch (CPU, and a CUDA fallback without Triton).

Two routes, picked per projection call by a small cost model; both read each active adapter
about once per call and neither loops over requests in Python:

padded:  tokens are sorted by slot and laid out as [span, c_max] (c_max = most tokens of one
         slot; 1 for a decode batch of distinct adapters) over the contiguous slot range
         [lo, lo + span) that holds every active slot (the manager hands out the lowest free
         slot first, so that range stays dense). Then ONE batched GEMM for the shrink,
         x_pad [span, c_max, in] @ A[lo:lo+span]^T (a strided view of the stack, no copy), and
         ONE per sub-module for the expand, h [span, c_max, R] @ B^T[lo:lo+span], scattered
         back to the tokens' rows of y. Each weight is used c_max times: GEMV-like and
         memory-bound at decode sizes, which is the best a CPU does here.
grouped: per active slot, its tokens (a slice when they form one run, as in prefill) go
         through one shrink GEMM and one expand GEMM per sub-module: no padding waste, a few
         small ops per adapter. Wins when one slot has many more tokens than others.
native:  the fused C++ kernel `lora_bgmv` (server/kernels/csrc/lora.cpp; twin:
         reference.lora_bgmv_ref), when the engine built the CPU kernels, everything is float32
         and no slot has more than NATIVE_MAX_TOKENS_PER_SLOT tokens (decode): shrink and expand
         of every sub-module in one call, one adapter read per token, no padding or scatter.

(A third layout, one GEMM x [T, in] @ A_cat [in, span * Ra] with a one-hot mask, was measured
slower at decode on CPU: it does T times the FLOPs and MKL reaches less bandwidth at M = 16.)
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Callable

import torch
import torch.nn.functional as F

from ..batch_info import LoraBatchInfo, sort_by_slot
from ..delta import LoraStep, ProjLoraWeights


NATIVE_MAX_TOKENS_PER_SLOT = 4     # beyond this, GEMMs over a slot's tokens reuse weights better
NATIVE_WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class CostModel:
    """Rough machine constants for choosing a route (2-core AVX-512 CPU, float32)."""

    flops_per_s: float = 6e10
    bytes_per_s: float = 1.2e10
    op_overhead_s: float = 8e-6

    def seconds(self, flops: float, moved_bytes: float, num_ops: int) -> float:
        return flops / self.flops_per_s + moved_bytes / self.bytes_per_s + num_ops * self.op_overhead_s


@dataclass(frozen=True)
class PaddedLayout:
    """Tokens sorted by slot into a [span, c_max] grid over slots lo .. lo + span - 1.

    gather:   [span * c_max] token index of each grid row (padding rows repeat a real token;
              their results are dropped).
    tokens:   [num_valid] token index of each valid grid row, in grid order.
    rows:     [num_valid] grid row of each valid token; None when every grid row is valid.
    identity: the grid is exactly tokens 0..T-1 in order (no gather or scatter needed).
    """

    lo: int
    span: int
    c_max: int
    gather: torch.Tensor
    tokens: torch.Tensor
    rows: torch.Tensor | None
    identity: bool


def padded_layout(token_slots: torch.Tensor, lo: int, span: int,
                  slot_order: tuple[torch.Tensor, torch.Tensor] | None = None) -> PaddedLayout:
    """Vectorized bucketing of tokens by slot (no Python loop over tokens). slot_order: the
    batch metadata's tokens sorted by slot (LoraBatchInfo.slot_order), computed when None."""
    num_tokens = token_slots.numel()
    if slot_order is None:
        slot_order = sort_by_slot(token_slots)
    tokens, slots = slot_order[0], slot_order[1] - lo                      # [V], slots in [0, span)
    counts = torch.bincount(slots, minlength=span)                          # [span]
    c_max = int(counts.max())
    firsts = torch.cumsum(counts, 0) - counts                               # [span]
    within = torch.arange(tokens.numel(), device=tokens.device) - firsts.index_select(0, slots)
    rows = slots * c_max + within                                           # [V]
    full = tokens.numel() == span * c_max
    gather = torch.full((span * c_max,), int(tokens[0]), dtype=torch.int64, device=tokens.device)
    gather[rows] = tokens
    identity = full and tokens.numel() == num_tokens and bool(
        (tokens == torch.arange(num_tokens, device=tokens.device)).all())
    return PaddedLayout(lo, span, c_max, gather, tokens, None if full else rows, identity)


class TorchPlan:
    """Routing shared by all projections of one step (each part built lazily, once)."""

    def __init__(self, info: LoraBatchInfo, scales: torch.Tensor):
        self.info = info
        self.scales = scales
        self.num_tokens = int(info.token_slots.numel())
        self.active = info.active_slots
        self.lo = self.active[0] if self.active else 0
        self.span = self.active[-1] - self.lo + 1 if self.active else 0
        self.routes: dict[tuple, str] = {}      # chosen route per projection shape, this step

    @cached_property
    def padded(self) -> PaddedLayout:
        return padded_layout(self.info.token_slots, self.lo, self.span, self.info.slot_order)

    @cached_property
    def span_scales(self) -> torch.Tensor:
        """[span, 1, 1] scale of each slot of the range."""
        return self.scales[self.lo:self.lo + self.span].view(self.span, 1, 1)

    @cached_property
    def groups(self) -> tuple[tuple[int, float, slice | torch.Tensor], ...]:
        """(slot, scale, rows) per active slot; rows is a slice when its tokens form one run."""
        info = self.info
        runs: dict[int, list[tuple[int, int]]] = {}
        for start, length, slot in zip(info.seg_starts.tolist(), info.seg_lens.tolist(),
                                       info.seg_slots.tolist()):
            if slot >= 0:
                runs.setdefault(slot, []).append((start, length))
        scales = self.scales.tolist()
        out = []
        for slot, slot_runs in sorted(runs.items()):
            if len(slot_runs) == 1:
                rows: slice | torch.Tensor = slice(slot_runs[0][0], sum(slot_runs[0]))
            else:
                rows = torch.nonzero(info.token_slots == slot).flatten()
            out.append((slot, scales[slot], rows))
        return tuple(out)


# ---- padded route: shrink and expand as batched GEMMs over the slot range --------------

def padded_shrink(x: torch.Tensor, a: torch.Tensor, lay: PaddedLayout) -> torch.Tensor:
    """x [T, in] (a's dtype), a [S, Ra, in] -> [span, c_max, Ra] (rows in grid order)."""
    x_pad = x if lay.identity else x.index_select(0, lay.gather)           # [span * c_max, in]
    a_span = a[lay.lo:lay.lo + lay.span]                                   # [span, Ra, in] view
    # A @ x^T rather than x @ A^T: the same products, but MKL streams each A row-major (the
    # GEMV layout), ~1.4x the bandwidth of the transposed form at decode sizes on CPU.
    x_t = x_pad.view(lay.span, lay.c_max, -1).transpose(1, 2)               # [span, in, c_max]
    return torch.bmm(a_span, x_t).transpose(1, 2)                           # [span, c_max, Ra] view


def padded_expand(h: torch.Tensor, bt: torch.Tensor, lay: PaddedLayout, y: torch.Tensor,
                  col_start: int) -> None:
    """h [span, c_max, R] (scaled), bt [S, R, out_m]: y[token, cols] += h[row] @ bt[slot]."""
    out_m = bt.shape[-1]
    target = y[:, col_start:col_start + out_m]                              # [T, out_m] view
    delta = torch.bmm(h, bt[lay.lo:lay.lo + lay.span]).view(-1, out_m)      # [span * c_max, out_m]
    if lay.rows is not None:
        delta = delta.index_select(0, lay.rows)
    if delta.dtype != y.dtype:
        delta = delta.to(y.dtype)
    if lay.identity:
        target += delta
    else:
        target.index_add_(0, lay.tokens, delta)


def padded_delta(x: torch.Tensor, y: torch.Tensor, w: ProjLoraWeights, plan: TorchPlan) -> None:
    """x [T, in] (adapter dtype), y [T, out]."""
    lay, rank = plan.padded, w.rank
    h = padded_shrink(x, w.a, lay).mul_(plan.span_scales)                   # [span, c_max, subs * R]
    for m, (bt, col_start) in enumerate(zip(w.bts, w.col_starts)):
        padded_expand(h[:, :, m * rank:(m + 1) * rank], bt, lay, y, col_start)


# ---- grouped route: one GEMM pair per active slot -----------------------------------

def grouped_delta(x: torch.Tensor, y: torch.Tensor, w: ProjLoraWeights, plan: TorchPlan) -> None:
    """x [T, in] (adapter dtype), y [T, out]."""
    rank = w.rank
    for slot, scale, rows in plan.groups:
        h = F.linear(x[rows], w.a[slot]) * scale                                 # [n_s, subs * R]
        for m, (bt, col_start) in enumerate(zip(w.bts, w.col_starts)):
            delta = (h[:, m * rank:(m + 1) * rank] @ bt[slot]).to(y.dtype)       # [n_s, out_m]
            target = y[:, col_start:col_start + bt.shape[-1]]
            if isinstance(rows, slice):
                target[rows] += delta
            else:
                target.index_add_(0, rows, delta)


class TorchOps:
    """Fast pure-torch backend; shrink/expand have the reference's signatures and semantics."""

    name = "torch"

    def __init__(self, cost: CostModel | None = None, native_bgmv=None):
        """native_bgmv: the fused kernel (native.py module's lora_bgmv) or None."""
        self.cost = cost or CostModel()
        self.native_bgmv = native_bgmv

    def prepare(self, info: LoraBatchInfo, scales: torch.Tensor) -> LoraStep:
        return LoraStep(info=info, scales=scales, plan=TorchPlan(info, scales))

    def add_delta(self, x: torch.Tensor, y: torch.Tensor, weights: ProjLoraWeights, step: LoraStep) -> None:
        plan: TorchPlan = step.plan
        if plan.span == 0:
            return
        route = self._route(weights, plan, lambda: self.native_fits(x, y, weights, plan))
        if route == "native":       # float32 activations; the kernel widens half weights itself
            self.native_bgmv(x, y, weights.a, list(weights.bts), list(weights.col_starts),
                             plan.info.token_slots, plan.scales)
            return
        if x.dtype != weights.a.dtype:
            x = x.to(weights.a.dtype)
        if route == "padded":
            padded_delta(x, y, weights, plan)
        else:
            grouped_delta(x, y, weights, plan)

    def native_delta(self, weights: ProjLoraWeights, step: LoraStep) -> tuple | None:
        """For decode_stack (model/decode_stack.py), which calls the fused kernel itself on float32
        CPU activations: `()` when the step has no delta to add, (a, bts, col_starts) when the
        delta takes the fused kernel, None when it takes a torch route (the stack then leaves
        the step to the layer-by-layer path)."""
        plan: TorchPlan = step.plan
        if plan.span == 0:
            return ()
        route = self._route(weights, plan,
                            lambda: self.native_bgmv is not None and self.weights_fit_native(weights, plan))
        return (weights.a, list(weights.bts), list(weights.col_starts)) if route == "native" else None

    def _route(self, weights: ProjLoraWeights, plan: TorchPlan, native_fits: Callable[[], bool]) -> str:
        """This step's route for a projection shape, decided at its first projection and cached in
        the plan: "native" when native_fits(), else the cost model's choice."""
        key = (weights.rank, weights.in_features, weights.out_sizes)       # same for every layer
        route = plan.routes.get(key)
        if route is None:
            route = plan.routes[key] = "native" if native_fits() else self.choose_route(weights, plan)
        return route

    def native_fits(self, x: torch.Tensor, y: torch.Tensor, w: ProjLoraWeights, plan: TorchPlan) -> bool:
        """The fused kernel applies: built, float32 CPU activations and scales, adapter weights
        float32 / bfloat16 / float16 in its layouts, decode-like."""
        return (self.native_bgmv is not None
                and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in (x, y))
                and self.weights_fit_native(w, plan))

    def weights_fit_native(self, w: ProjLoraWeights, plan: TorchPlan) -> bool:
        """The adapter side of native_fits: CPU, float32 scales, weights in the kernel's dtypes
        and layouts, at most NATIVE_MAX_TOKENS_PER_SLOT tokens per slot."""
        return (all(t.device.type == "cpu" for t in (w.a, plan.scales, *w.bts))
                and plan.scales.dtype == torch.float32
                and w.a.dtype in NATIVE_WEIGHT_DTYPES and all(bt.dtype == w.a.dtype for bt in w.bts)
                and w.a.is_contiguous() and all(bt.is_contiguous() for bt in w.bts)
                and plan.scales.is_contiguous() and plan.info.token_slots.dtype == torch.int64
                and plan.padded.c_max <= NATIVE_MAX_TOKENS_PER_SLOT)

    def choose_route(self, w: ProjLoraWeights, plan: TorchPlan) -> str:
        """'padded' or 'grouped', whichever the cost model expects to be faster."""
        per_slot = w.rank * (w.num_subs * w.in_features + sum(w.out_sizes))    # adapter params
        elt = w.a.element_size()
        num_active, num_tokens = len(plan.active), plan.num_tokens
        if num_active == 1:
            return "grouped"
        grid = plan.span * plan.padded.c_max
        padded = self.cost.seconds(2.0 * grid * per_slot, plan.span * per_slot * elt, 3 + 2 * w.num_subs)
        grouped = self.cost.seconds(2.0 * num_tokens * per_slot, num_active * per_slot * elt,
                                    num_active * (3 + 2 * w.num_subs))
        return "padded" if padded <= grouped else "grouped"

    # ---- shrink / expand with the reference's signatures (padded route) ----------------
    def bgmv_shrink(self, x: torch.Tensor, a: torch.Tensor, token_slots: torch.Tensor) -> torch.Tensor:
        """x [T, in], a [S, Ra, in] -> h [T, Ra] (0 for slot -1)."""
        h = x.new_zeros(x.shape[0], a.shape[1], dtype=a.dtype)
        lay = _layout(token_slots)
        if lay is None:
            return h
        grid = padded_shrink(x.to(a.dtype), a, lay).reshape(-1, a.shape[1])     # [span * c_max, Ra]
        if lay.rows is not None:
            grid = grid.index_select(0, lay.rows)
        return h.index_copy_(0, lay.tokens, grid)

    def bgmv_expand(self, h: torch.Tensor, bt: torch.Tensor, token_slots: torch.Tensor,
                    scales: torch.Tensor, y: torch.Tensor, col_start: int) -> None:
        """h [T, R], bt [S, R, out_m]; y[t, cols] += scale[s_t] * h[t] @ bt[s_t]."""
        if h.shape[-1] != bt.shape[1]:
            raise ValueError(f"h has rank {h.shape[-1]} but the B stack has rank {bt.shape[1]}")
        lay = _layout(token_slots)
        if lay is None:
            return
        h_pad = h.to(bt.dtype).index_select(0, lay.gather).view(lay.span, lay.c_max, -1)
        span_scales = scales[lay.lo:lay.lo + lay.span].view(lay.span, 1, 1)
        padded_expand(h_pad * span_scales, bt, lay, y, col_start)

    def sgmv_shrink(self, x: torch.Tensor, a: torch.Tensor, seg_starts: torch.Tensor,
                    seg_lens: torch.Tensor, seg_slots: torch.Tensor) -> torch.Tensor:
        return self.bgmv_shrink(x, a, _segments_to_tokens(seg_starts, seg_lens, seg_slots, x.shape[0]))

    def sgmv_expand(self, h: torch.Tensor, bt: torch.Tensor, seg_starts: torch.Tensor,
                    seg_lens: torch.Tensor, seg_slots: torch.Tensor, scales: torch.Tensor,
                    y: torch.Tensor, col_start: int) -> None:
        token_slots = _segments_to_tokens(seg_starts, seg_lens, seg_slots, h.shape[0])
        self.bgmv_expand(h, bt, token_slots, scales, y, col_start)


def _layout(token_slots: torch.Tensor) -> PaddedLayout | None:
    valid = token_slots[token_slots >= 0]
    if valid.numel() == 0:
        return None
    lo = int(valid.min())
    return padded_layout(token_slots, lo, int(valid.max()) - lo + 1)


def _segments_to_tokens(seg_starts: torch.Tensor, seg_lens: torch.Tensor, seg_slots: torch.Tensor,
                        num_tokens: int) -> torch.Tensor:
    """Segments -> token_slots [T] (tokens in no segment get -1)."""
    token_slots = torch.full((num_tokens,), -1, dtype=torch.int64, device=seg_slots.device)
    for start, length, slot in zip(seg_starts.tolist(), seg_lens.tolist(), seg_slots.tolist()):
        token_slots[start:start + length] = slot
    return token_slots

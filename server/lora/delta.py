"""Types between the slot pool and the LoRA ops, and the hook a projection calls each forward."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch

from .batch_info import LoraBatchInfo
from .dora import apply_dora


@dataclass(frozen=True)
class ProjLoraWeights:
    """One projection's adapter stacks, for every slot of the pool (views into the pool).

    a:          [max_loras, num_subs * rank, in_features]; sub-module m owns rows
                m*rank:(m+1)*rank (the fused projection's A = concat over sub-modules along
                the rank dim, so one shrink covers q, k and v together). Zero rows pad
                ranks below `rank` and stand for untargeted sub-modules.
    bts:        per sub-module, B transposed: [max_loras, rank, out_m]. Stored transposed so
                that a contiguous range of slots is one [n * rank, out_m] matrix (a view).
    col_starts: first output column of each sub-module in the projection's output.
    rank:       the stack rank (the largest rank loaded, every slot padded to it).
    """

    a: torch.Tensor
    bts: tuple[torch.Tensor, ...]
    col_starts: tuple[int, ...]
    rank: int

    @property
    def num_subs(self) -> int:
        return len(self.bts)

    @property
    def in_features(self) -> int:
        return self.a.shape[-1]

    @property
    def out_sizes(self) -> tuple[int, ...]:
        return tuple(bt.shape[-1] for bt in self.bts)


@dataclass(frozen=True)
class LoraStep:
    """What every projection of one forward pass shares: the routing and per-slot scales.

    scales: [max_loras] in the adapter dtype (lora_alpha / r, or / sqrt(r) with rsLoRA).
    plan:   backend-specific precomputation (masks, slot ranges), built once per step by
            `ops.prepare`; None for backends that need none.
    dora:   the tokens on DoRA slots (dora.DoraRows), None when the step has none; the
            projection hooks scale those rows after the delta (see dora.py).
    vocab:  the pool's vocab.VocabSlots when a slot of the step has embedding / lm_head
            tensors (the model's embedding and the runner's logits call it), else None.
    """

    info: LoraBatchInfo
    scales: torch.Tensor
    plan: Any = None
    dora: Any = None
    vocab: Any = None


class LoraOps(Protocol):
    """A LoRA delta backend (reference, torch, triton): what the engine calls each step.

    `prepare` runs once per forward pass (the runner calls it through SlotPool.prepare_step);
    `add_delta` once per projection. Each backend also exposes the BGMV/SGMV shrink/expand of
    reference.py with the same signatures; those are its twins' test surface, not part of this
    protocol. Shapes: x [T, in], y [T, out], scales [S].
    """

    name: str

    def prepare(self, info: LoraBatchInfo, scales: torch.Tensor) -> LoraStep: ...

    def add_delta(self, x: torch.Tensor, y: torch.Tensor, weights: ProjLoraWeights, step: LoraStep) -> None: ...


class ProjLoraHook:
    """The `proj.lora` hook: y += this step's per-token LoRA delta for projection `index`.

    It reads the pool's current stacks at call time (they are re-laid out when the stack rank
    changes); the step's routing comes prepared in the forward context (`LoraStep`).
    """

    def __init__(self, get_weights: Callable[[], ProjLoraWeights], ops: LoraOps,
                 get_dora: Callable[[], tuple[torch.Tensor, torch.Tensor | None]] | None = None):
        self._get_weights = get_weights
        self._ops = ops
        self._get_dora = get_dora      # -> (DoRA scales [S, out] float32, base bias [out] or None)

    def add_delta(self, x: torch.Tensor, y: torch.Tensor, step: LoraStep) -> None:
        """x [T, in], y [T, out] (modified in place); then DoRA rows get their per-output scale."""
        self._ops.add_delta(x, y, self._get_weights(), step)
        if step.dora is not None and self._get_dora is not None:
            scales, bias = self._get_dora()
            apply_dora(y, step.dora, scales, bias)

    def native_args(self, step: LoraStep) -> tuple | None:
        """The fused-kernel arguments of this step's delta (ops.native_delta: `()` for no delta,
        (a, bts, col_starts), or None when the ops have no fused route for it). DoRA rows' scale
        comes separately (`native_dora`), applied by the fused decode stack after the delta."""
        native_delta = getattr(self._ops, "native_delta", None)
        return None if native_delta is None else native_delta(self._get_weights(), step)

    def native_dora(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(DoRA factors [S, out] float32, base bias [out] or None) for the fused decode stack's
        dora_scale_rows, on a step with DoRA rows (the pool holds factors then); (None, None)
        for a hook without DoRA."""
        return (None, None) if self._get_dora is None else self._get_dora()

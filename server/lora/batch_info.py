"""Per-step description of which adapter slot each token uses (built by the runner).

The batch keeps the scheduler's order; this metadata carries the grouping the delta kernels
need (runs of equal slots for SGMV, tokens sorted by slot for the padded/grouped routes), the
way vLLM's LoRA kernel metadata does, so nobody reorders the batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch


@dataclass(frozen=True)
class LoraBatchInfo:
    """Adapter routing for one packed batch of tokens.

    token_slots:  [num_tokens] int64, the slot pool index of each token's adapter, -1 = none.
    seg_starts:   [num_segments] int64, first token of each run of equal slots (SGMV view).
    seg_lens:     [num_segments] int64, length of each run.
    seg_slots:    [num_segments] int64, slot of each run (-1 = none).
    active_slots: sorted distinct slots >= 0 used by this batch (python list; small).
    """

    token_slots: torch.Tensor
    seg_starts: torch.Tensor
    seg_lens: torch.Tensor
    seg_slots: torch.Tensor
    active_slots: tuple[int, ...]

    @property
    def has_adapters(self) -> bool:
        return bool(self.active_slots)

    @cached_property
    def slot_order(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens [V], slots [V]): the tokens with an adapter, stably sorted by slot, and
        their slots. Computed once per step, on first use."""
        return sort_by_slot(self.token_slots)

    @staticmethod
    def from_token_slots(token_slots: torch.Tensor) -> "LoraBatchInfo":
        """Derive the segment view from per-token slots. token_slots: [num_tokens] int64."""
        slots = token_slots.to(torch.int64)
        n = slots.numel()
        if n == 0:
            empty = torch.zeros(0, dtype=torch.int64)
            return LoraBatchInfo(slots, empty, empty, empty, ())
        change = torch.ones(n, dtype=torch.bool, device=slots.device)
        change[1:] = slots[1:] != slots[:-1]
        seg_starts = torch.nonzero(change).flatten()
        ends = torch.cat([seg_starts[1:], torch.tensor([n], device=slots.device)])
        seg_slots = slots[seg_starts]
        active = tuple(sorted({int(s) for s in seg_slots.tolist() if s >= 0}))
        return LoraBatchInfo(slots, seg_starts, ends - seg_starts, seg_slots, active)


def sort_by_slot(token_slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """token_slots [T] -> (tokens [V], slots [V]) of the tokens with slot >= 0, stably by slot."""
    tokens = torch.nonzero(token_slots >= 0).flatten()                           # [V]
    slots = token_slots.index_select(0, tokens)                                  # [V]
    order = torch.argsort(slots, stable=True)
    return tokens.index_select(0, order), slots.index_select(0, order)

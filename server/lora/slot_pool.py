"""Device slots holding adapter weights, stacked per projection, and the hooks that read them."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Sequence

import torch

from .batch_info import LoraBatchInfo
from .delta import LoraOps, LoraStep, ProjLoraHook, ProjLoraWeights
from .dora import DoraScaler, base_bias, dora_rows
from .experts import ExpertSlots
from .vocab import VocabSlots
from .ops import select_ops
from ...adapters_store.types import LoadedAdapter


@dataclass(frozen=True)
class _Target:
    """Where an HF module's A/B go: projection index, sub-module index, shapes."""

    proj_idx: int
    sub_idx: int
    in_features: int
    out_features: int


class SlotPool:
    """Stacked A/B for `max_loras` slots on every LoRA target projection.

    targets: ProjLinear-like objects (layer_idx, sub_names, out_sizes, in_features or
    base.in_features, and a writable `lora` attribute); the pool attaches its hooks to them.
    All slots are padded to one stack rank, the largest rank loaded (at most max_lora_rank);
    the stacks are re-laid out when it changes, so a pool of rank-16 adapters reads rank-16
    stacks even when max_lora_rank is 64. reserve=True allocates for max_lora_rank up front.
    """

    def __init__(self, targets: Sequence[Any], max_loras: int, max_lora_rank: int,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 ops: LoraOps | None = None, reserve: bool = False, vocab: VocabSlots | None = None,
                 experts: ExpertSlots | None = None):
        if max_loras < 1 or max_lora_rank < 1:
            raise ValueError(f"max_loras ({max_loras}) and max_lora_rank ({max_lora_rank}) must be >= 1")
        self.max_loras, self.max_lora_rank = max_loras, max_lora_rank
        self.dtype, self.device = dtype, torch.device(device)
        self.ops = ops or select_ops(self.device)
        self.targets = list(targets)
        self._index = _index_targets(self.targets)
        self.scales = torch.zeros(max_loras, dtype=torch.float32, device=self.device)   # [S] float32 always
        self.slot_ranks = [0] * max_loras
        self.stack_rank = 0
        self._a_bufs = [self._empty(0) for _ in self.targets]
        self._bt_bufs = [[self._empty(0) for _ in t.out_sizes] for t in self.targets]
        self.weights: list[ProjLoraWeights] = []
        self._relayout(max_lora_rank if reserve else 1)
        self.vocab = vocab                             # embedding / lm_head adapters (None: refused)
        self.experts = experts                         # MoE expert adapters (None: refused)
        self.dora_scaler = DoraScaler(self.targets)    # the store's load finisher (engine builder)
        self._dora: list[tuple[torch.Tensor, torch.Tensor | None]] = []   # per target: [S, out], bias
        self._dora_slots: set[int] = set()
        for i, target in enumerate(self.targets):
            target.lora = ProjLoraHook(lambda i=i: self.weights[i], self.ops, lambda i=i: self._dora[i])

    # ---- public -------------------------------------------------------------------
    def load(self, slot: int, adapter: LoadedAdapter) -> None:
        """Copy an adapter into `slot` (zero-padding its rank, zeroing untargeted modules)."""
        self._check_slot(slot)
        rank = self._check_adapter(adapter)
        if rank > self.stack_rank:
            self._relayout(rank)
        self._zero_slot(slot)
        self._clear_dora(slot)
        if self.vocab is not None:
            self.vocab.clear(slot)
        r_stack = self.stack_rank
        with torch.no_grad():
            for (layer, name), (lora_a, lora_b) in adapter.weights.items():
                where = self._index[(layer, name)]
                r = lora_a.shape[0]
                w = self.weights[where.proj_idx]
                row0 = where.sub_idx * r_stack
                w.a[slot, row0:row0 + r].copy_(lora_a)                         # [r, in]
                w.bts[where.sub_idx][slot, :r].copy_(lora_b.T)                 # [r, out_m]
        if adapter.is_dora:
            self._load_dora(slot, adapter)
        if adapter.vocab is not None:
            self.vocab.load(slot, adapter.vocab, adapter.config.scaling, self.dtype)
        if self.experts is not None:
            self.experts.load(slot, adapter)
        self.scales[slot] = adapter.config.scaling
        self.slot_ranks[slot] = rank

    def clear(self, slot: int) -> None:
        """Zero `slot`; shrink the stack rank when the largest remaining rank is half or less."""
        self._check_slot(slot)
        self._zero_slot(slot)
        self._clear_dora(slot)
        if self.vocab is not None:
            self.vocab.clear(slot)
        if self.experts is not None:
            self.experts.clear(slot)
        self.scales[slot] = 0.0
        self.slot_ranks[slot] = 0
        largest = max(self.slot_ranks)
        if 0 < largest and 2 * largest <= self.stack_rank:
            self._relayout(largest)

    def shrink_to_loaded(self) -> None:
        """Re-pad the stacks to the largest loaded rank (1 when no slot holds an adapter)."""
        largest = max(max(self.slot_ranks), 1)
        if largest < self.stack_rank:
            self._relayout(largest)

    def prepare_step(self, info: LoraBatchInfo) -> LoraStep:
        """The step's routing for the ops, shared by every projection of one forward pass.

        The runner calls it once per step, after the batch's adapters are in their slots."""
        step = self.ops.prepare(info, self.scales)
        if self.vocab is not None and self.vocab.active(info.active_slots):
            step = replace(step, vocab=self.vocab)
        dora = self._dora_slots.intersection(info.active_slots)
        if not dora:
            return step
        slots = torch.tensor(sorted(dora), dtype=torch.int64, device=info.token_slots.device)
        return replace(step, dora=dora_rows(info.token_slots, slots))

    def detach(self) -> None:
        """Remove the hooks from the targets."""
        for target in self.targets:
            target.lora = None
        if self.experts is not None:
            for block in self.experts.blocks.values():
                block.lora = None

    def nbytes(self) -> int:
        """Bytes of the current stacks (all slots), DoRA scales included."""
        return (sum(w.a.nbytes + sum(bt.nbytes for bt in w.bts) for w in self.weights)
                + sum(scales.nbytes for scales, _ in self._dora) + (0 if self.vocab is None else self.vocab.nbytes())
                + (0 if self.experts is None else self.experts.nbytes()))

    @property
    def dora_slots(self) -> frozenset[int]:
        """Slots that hold a DoRA adapter."""
        return frozenset(self._dora_slots)

    # ---- internals ------------------------------------------------------------------
    def _load_dora(self, slot: int, adapter: LoadedAdapter) -> None:
        """Write the adapter's per-output DoRA scales into `slot` (1 for modules it leaves plain)."""
        scales = adapter.dora_scales or self.dora_scaler.scales(adapter)   # computed at host load normally
        if not self._dora:          # first DoRA adapter: allocate the per-slot scales (1 = no scale)
            self._dora = [(torch.ones(self.max_loras, sum(t.out_sizes), dtype=torch.float32, device=self.device),
                           _bias_on(t, self.device)) for t in self.targets]
        with torch.no_grad():
            for (layer, name), scale in scales.items():
                where = self._index[(layer, name)]
                start = _col_starts(self.targets[where.proj_idx].out_sizes)[where.sub_idx]
                self._dora[where.proj_idx][0][slot, start:start + where.out_features].copy_(scale)
        self._dora_slots.add(slot)

    def _clear_dora(self, slot: int) -> None:
        if slot in self._dora_slots:
            for scales, _ in self._dora:
                scales[slot].fill_(1.0)
            self._dora_slots.discard(slot)

    def _empty(self, numel: int) -> torch.Tensor:
        return torch.zeros(numel, dtype=self.dtype, device=self.device)

    def _relayout(self, rank: int) -> None:
        """Re-pad every stack to `rank`, keeping each slot's first min(old, new) rank rows."""
        old_weights, old_rank = self.weights, self.stack_rank
        keep = min(old_rank, rank)
        new_weights = []
        for i, target in enumerate(self.targets):
            subs, in_features = len(target.out_sizes), _in_features(target)
            a = self._resized(self._a_bufs, i, (self.max_loras, subs, rank, in_features))
            if old_weights:
                old_a = old_weights[i].a.view(self.max_loras, subs, old_rank, in_features)[:, :, :keep].clone()
                a.zero_()
                a[:, :, :keep] = old_a
            bts = []
            for m, out_m in enumerate(target.out_sizes):
                bt = self._resized(self._bt_bufs[i], m, (self.max_loras, rank, out_m))
                if old_weights:
                    old_bt = old_weights[i].bts[m][:, :keep].clone()
                    bt.zero_()
                    bt[:, :keep] = old_bt
                bts.append(bt)
            new_weights.append(ProjLoraWeights(a=a.view(self.max_loras, subs * rank, in_features),
                                               bts=tuple(bts), col_starts=_col_starts(target.out_sizes),
                                               rank=rank))
        self.weights, self.stack_rank = new_weights, rank

    def _resized(self, bufs: list[torch.Tensor], j: int, shape: tuple[int, ...]) -> torch.Tensor:
        """A view of bufs[j] with `shape`, growing the flat buffer when it is too small."""
        numel = 1
        for dim in shape:
            numel *= dim
        if bufs[j].numel() < numel:
            bufs[j] = self._empty(numel)
        return bufs[j][:numel].view(shape)

    def _zero_slot(self, slot: int) -> None:
        with torch.no_grad():
            for w in self.weights:
                w.a[slot].zero_()
                for bt in w.bts:
                    bt[slot].zero_()

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.max_loras:
            raise IndexError(f"slot {slot} is outside the pool's 0..{self.max_loras - 1}")

    def _check_adapter(self, adapter: LoadedAdapter) -> int:
        """Validate shapes against the targets; return the adapter's largest rank."""
        rank = 0
        for (layer, name), (lora_a, lora_b) in adapter.weights.items():
            where = self._index.get((layer, name))
            if where is None:
                raise ValueError(f"adapter {adapter.key}: layer {layer} module {name!r} is not a LoRA "
                                 "target of this model")
            r = lora_a.shape[0]
            expected_a, expected_b = (r, where.in_features), (where.out_features, r)
            if tuple(lora_a.shape) != expected_a or tuple(lora_b.shape) != expected_b:
                raise ValueError(f"adapter {adapter.key}: layer {layer} {name} has A {tuple(lora_a.shape)}, "
                                 f"B {tuple(lora_b.shape)}; the base needs A {expected_a}, B {expected_b}")
            rank = max(rank, r)
        if rank > self.max_lora_rank:
            raise ValueError(f"adapter {adapter.key} has rank {rank} > max_lora_rank {self.max_lora_rank}; "
                             "raise --max-lora-rank")
        if adapter.vocab is not None and self.vocab is None:
            raise ValueError(f"adapter {adapter.key} adapts embed_tokens / lm_head, which this pool does not serve")
        if adapter.experts:
            if self.experts is None:
                raise ValueError(f"adapter {adapter.key} adapts MoE experts, which this pool does not serve")
            self.experts.check(adapter)
        scaling = adapter.config.scaling
        if not math.isfinite(scaling) or abs(scaling) > torch.finfo(self.dtype).max:
            raise ValueError(f"adapter {adapter.key}: its scale {scaling:g} does not fit {self.dtype}")
        return max(rank, 1)


def _bias_on(target: Any, device: torch.device) -> torch.Tensor | None:
    bias = base_bias(target.base)
    return None if bias is None else bias.to(device)


def _in_features(target: Any) -> int:
    value = getattr(target, "in_features", None)
    return int(value if value is not None else target.base.in_features)


def _col_starts(out_sizes: Sequence[int]) -> tuple[int, ...]:
    starts, total = [], 0
    for size in out_sizes:
        starts.append(total)
        total += size
    return tuple(starts)


def _index_targets(targets: Sequence[Any]) -> dict[tuple[int, str], _Target]:
    index: dict[tuple[int, str], _Target] = {}
    for i, target in enumerate(targets):
        in_features = _in_features(target)
        for m, (name, out_m) in enumerate(zip(target.sub_names, target.out_sizes)):
            if (target.layer_idx, name) in index:
                raise ValueError(f"two targets claim layer {target.layer_idx} module {name!r}")
            index[(target.layer_idx, name)] = _Target(i, m, in_features, out_m)
    return index

"""Expert LoRA: per-slot A/B stacks for every MoE layer's experts, applied per routed token.

PEFT targets a Qwen3-MoE model's fused 3-D expert parameters with `target_parameters`
(`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`; lora.ParamWrapper): one rank-r LoRA per
expert, W_e' = W_e + scale * B_e @ A_e. Here each slot holds, per layer and parameter,

    a:  [max_loras, num_experts, rank, in_features]
    bt: [max_loras, num_experts, rank, out_features]   (B_e transposed)

and a MoE block calls `add_delta` for each expert it runs: the expert's tokens that use an
adapter get x @ A_e^T @ B_e^T * scale of their own slot, so one batch mixes adapters and each
token's delta follows the experts it was routed to. Stacks are allocated when the first expert
adapter is loaded (a pool serving attention-only adapters holds none) and grow with the largest
rank loaded. Pure torch; the layer path only (the native decode stack does not serve MoE).
"""

from __future__ import annotations

import torch

from ...adapters_store.types import LoadedAdapter
from .delta import LoraStep

ExpertWeights = dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]   # (layer, param) -> (A, B)


class ExpertSlots:
    """Expert LoRA stacks for `max_loras` slots over `blocks` (model.moe_blocks()); attaches
    itself as each block's `lora` hook."""

    def __init__(self, blocks: list, max_loras: int, max_lora_rank: int, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu"):
        self.max_loras, self.max_lora_rank = max_loras, max_lora_rank
        self.dtype, self.device = dtype, torch.device(device)
        self.blocks = {block.layer_idx: block for block in blocks}
        self.shapes: dict[str, tuple[int, int, int]] = {}          # param -> (experts, in, out)
        for block in blocks:
            self.shapes = block.config.expert_shapes(block.router.shape[1])
            block.lora = _BlockHook(self, block.layer_idx)
        self.rank = 0
        self.stacks: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}   # (layer, param) -> (a, bt)
        self.loaded: set[int] = set()         # slots holding expert weights

    def check(self, adapter: LoadedAdapter) -> None:
        """ValueError naming the tensor when the adapter's expert weights do not fit these blocks."""
        for (layer, param), (a, b) in adapter.experts.items():
            if layer not in self.blocks or param not in self.shapes:
                raise ValueError(f"adapter {adapter.key}: layer {layer} has no experts' {param} to adapt")
            experts, in_features, out_features = self.shapes[param]
            r = max(a.shape[0] // experts, 1)
            if tuple(a.shape) != (experts * r, in_features) or tuple(b.shape) != (out_features, r * experts):
                raise ValueError(f"adapter {adapter.key}: layer {layer} experts {param} has A {tuple(a.shape)}, "
                                 f"B {tuple(b.shape)}; the base ({experts} experts) needs A "
                                 f"{(experts * r, in_features)}, B {(out_features, r * experts)}")
            if r > self.max_lora_rank:
                raise ValueError(f"adapter {adapter.key} has expert rank {r} > max_lora_rank {self.max_lora_rank}")

    def load(self, slot: int, adapter: LoadedAdapter) -> None:
        """Copy the adapter's expert A/B into `slot` (zero-padded to the stack rank)."""
        self.clear(slot)
        if not adapter.experts:
            return
        self._grow(max(a.shape[0] // self.shapes[param][0] for (_, param), (a, _) in adapter.experts.items()))
        with torch.no_grad():
            for (layer, param), (a, b) in adapter.experts.items():
                experts = self.shapes[param][0]
                r = a.shape[0] // experts
                stack_a, stack_bt = self.stacks[(layer, param)]
                # PEFT: expert e's A is rows e*r:(e+1)*r of A; its B^T row k is B's column k*E + e
                stack_a[slot, :, :r].copy_(a.view(experts, r, a.shape[1]))                    # [E, r, in]
                stack_bt[slot, :, :r].copy_(b.view(b.shape[0], r, experts).permute(2, 1, 0))  # [E, r, out]
        self.loaded.add(slot)

    def clear(self, slot: int) -> None:
        if slot in self.loaded:
            with torch.no_grad():
                for a, bt in self.stacks.values():
                    a[slot].zero_()
                    bt[slot].zero_()
            self.loaded.discard(slot)

    def nbytes(self) -> int:
        return sum(a.nbytes + bt.nbytes for a, bt in self.stacks.values())

    def add_delta(self, layer: int, expert: int, param: str, x: torch.Tensor, y: torch.Tensor,
                  tokens: torch.Tensor, step: LoraStep) -> None:
        """y [n, out] += each row's own slot's expert delta of x [n, in]; tokens [n]: batch rows."""
        active = self.loaded.intersection(step.info.active_slots)
        if not active:
            return
        stack_a, stack_bt = self.stacks[(layer, param)]
        slots = step.info.token_slots.index_select(0, tokens)                  # [n]
        for slot in sorted(active):
            rows = torch.nonzero(slots == slot).flatten()                     # [m]
            if rows.numel() == 0:
                continue
            shrunk = x.index_select(0, rows) @ stack_a[slot, expert].T         # [m, R]
            delta = (shrunk @ stack_bt[slot, expert]) * step.scales[slot].to(y.dtype)   # [m, out]
            y.index_add_(0, rows, delta.to(y.dtype))

    def _grow(self, rank: int) -> None:
        """Re-pad every stack to at least `rank` (allocating them on first use)."""
        if rank <= self.rank:
            return
        old, keep = self.stacks, self.rank
        self.stacks = {}
        for layer in self.blocks:
            for param, (experts, in_features, out_features) in self.shapes.items():
                a = torch.zeros(self.max_loras, experts, rank, in_features, dtype=self.dtype, device=self.device)
                bt = torch.zeros(self.max_loras, experts, rank, out_features, dtype=self.dtype, device=self.device)
                if (layer, param) in old:
                    a[:, :, :keep].copy_(old[(layer, param)][0])
                    bt[:, :, :keep].copy_(old[(layer, param)][1])
                self.stacks[(layer, param)] = (a, bt)
        self.rank = rank


class _BlockHook:
    """One MoE block's view of the expert slots (its `lora` attribute)."""

    def __init__(self, slots: ExpertSlots, layer: int):
        self._slots, self._layer = slots, layer

    def add_delta(self, expert: int, param: str, x: torch.Tensor, y: torch.Tensor, tokens: torch.Tensor,
                  step: LoraStep) -> None:
        self._slots.add_delta(self._layer, expert, param, x, y, tokens, step)

"""Qwen3-MoE's sparse MLP: a top-k softmax router over experts, each a SwiGLU MLP.

Exactly transformers 5's Qwen3MoeSparseMoeBlock: router logits in the compute dtype, softmax
over all experts in float32, top-k, optional renormalisation (`norm_topk_prob`), the weights
cast back to the compute dtype; every expert that any token was routed to runs once over its
tokens (gate_up -> silu(gate) * up -> down), scaled by the token's routing weight and added up
in expert order. Each expert's gate_up and down are ordinary base linears (layers/factory.py),
so every quantization backend quantizes the experts per expert, as it does nn.Linear layers.

Expert LoRA (PEFT `target_parameters` on `mlp.experts.gate_up_proj` / `down_proj`) comes in
through `MoeBlock.lora` (lora/experts.py): each token's expert outputs get its own adapter's
delta for the experts it was routed to.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from ..layers.base import QuantizedLinear, QuantSpec
from ..layers.factory import build_fused_linear, build_linear
from ..lora.delta import LoraStep
from .config import ModelConfig
from .loader import CheckpointReader, load_dense
from .moe_config import MoeConfig

EXPERT_PARAMS = ("gate_up_proj", "down_proj")      # PEFT target_parameters names (mlp.experts.<name>)


class ExpertLoraHook(Protocol):
    """Adds each routed token's adapter delta to one expert's gate_up or down output."""

    def add_delta(self, expert: int, param: str, x: torch.Tensor, y: torch.Tensor, tokens: torch.Tensor,
                  step: LoraStep) -> None:
        """y += delta in place; x [n, in], y [n, out]; tokens [n]: their rows in the step's batch."""
        ...


def route(hidden: torch.Tensor, router: torch.Tensor, top_k: int, norm_topk_prob: bool
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden [T, hidden], router [E, hidden] -> (weights [T, k] in hidden's dtype, experts [T, k] int64)."""
    logits = F.linear(hidden, router)                                          # [T, E]
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    top, experts = torch.topk(probs, top_k, dim=-1)                            # [T, k]
    if norm_topk_prob:
        top = top / top.sum(dim=-1, keepdim=True)
    return top.to(logits.dtype), experts


class MoeBlock(torch.nn.Module):
    """forward(hidden [T, hidden], lora) -> [T, hidden]: the routed experts' weighted sum."""

    def __init__(self, layer_idx: int, config: MoeConfig, router: torch.Tensor,
                 gate_up: list[QuantizedLinear], down: list[QuantizedLinear]):
        super().__init__()
        if not len(gate_up) == len(down) == config.num_experts:
            raise ValueError(f"layer {layer_idx}: {len(gate_up)} gate_up and {len(down)} down experts, "
                             f"config.json says {config.num_experts}")
        self.layer_idx = layer_idx
        self.config = config
        self.register_buffer("router", router)                 # [E, hidden]
        self.gate_up = torch.nn.ModuleList(gate_up)            # each [hidden] -> [2 * inter]
        self.down = torch.nn.ModuleList(down)                  # each [inter] -> [hidden]
        self._gate_up, self._down = list(gate_up), list(down)  # plain lists for the hot path
        self.lora: ExpertLoraHook | None = None

    def forward(self, hidden: torch.Tensor, lora: LoraStep | None) -> torch.Tensor:
        cfg = self.config
        weights, experts = route(hidden, self.router, cfg.top_k, cfg.norm_topk_prob)      # [T, k] each
        hook = self.lora if lora is not None else None
        out = torch.zeros_like(hidden)
        mask = F.one_hot(experts, num_classes=cfg.num_experts).permute(2, 1, 0)           # [E, k, T]
        for expert in torch.nonzero(mask.sum(dim=(1, 2))).flatten().tolist():
            pos, tokens = torch.where(mask[expert])                                       # [n] each
            x = hidden.index_select(0, tokens)                                            # [n, hidden]
            gate_up = self._gate_up[expert].linear(x)                                     # [n, 2 inter]
            if hook is not None:
                hook.add_delta(expert, "gate_up_proj", x, gate_up, tokens, lora)
            gate, up = gate_up.chunk(2, dim=-1)
            act = F.silu(gate) * up                                                       # [n, inter]
            y = self._down[expert].linear(act)                                            # [n, hidden]
            if hook is not None:
                hook.add_delta(expert, "down_proj", act, y, tokens, lora)
            out.index_add_(0, tokens, (y * weights[tokens, pos, None]).to(out.dtype))
        return out

    __call__ = forward

    def weight_bytes(self) -> int:
        return sum(linear.weight_bytes() for linear in (*self._gate_up, *self._down))


def load_moe_block(reader: CheckpointReader, config: ModelConfig, layer_idx: int, spec: QuantSpec) -> MoeBlock:
    """One layer's router and experts, from per-expert tensors (`mlp.experts.{e}.gate_proj.weight`,
    as the Hub's Qwen3-MoE checkpoints) or fused ones (`mlp.experts.gate_up_proj` [E, 2 inter, hidden])."""
    moe = config.moe
    prefix = f"model.layers.{layer_idx}.mlp."
    router = load_dense(reader, prefix + "gate.weight", spec)
    _check_shape(prefix + "gate.weight", router, (moe.num_experts, config.hidden_size))
    h, i = config.hidden_size, moe.intermediate_size
    gate_up, down = [], []
    if reader.has(prefix + "experts.gate_up_proj"):
        fused_gate_up, fused_down = reader.get(prefix + "experts.gate_up_proj"), reader.get(prefix + "experts.down_proj")
        _check_shape(prefix + "experts.gate_up_proj", fused_gate_up, (moe.num_experts, 2 * i, h))
        _check_shape(prefix + "experts.down_proj", fused_down, (moe.num_experts, h, i))
        for e in range(moe.num_experts):
            gate_up.append(build_fused_linear([fused_gate_up[e, :i], fused_gate_up[e, i:]], [None, None], spec))
            down.append(build_linear(fused_down[e], None, spec))
        return MoeBlock(layer_idx, moe, router, gate_up, down)
    for e in range(moe.num_experts):
        name = f"{prefix}experts.{e}."
        parts = [reader.get(name + sub + ".weight") for sub in ("gate_proj", "up_proj", "down_proj")]
        for sub, weight, shape in zip(("gate_proj", "up_proj", "down_proj"), parts, ((i, h), (i, h), (h, i))):
            _check_shape(name + sub + ".weight", weight, shape)
        gate_up.append(build_fused_linear(parts[:2], [None, None], spec))
        down.append(build_linear(parts[2], None, spec))
    return MoeBlock(layer_idx, moe, router, gate_up, down)


def _check_shape(name: str, tensor: torch.Tensor, expected: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != expected:
        raise ValueError(f"{name} has shape {tuple(tensor.shape)}, config.json implies {expected}")

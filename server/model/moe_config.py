"""The mixture-of-experts part of a model's config.json (Qwen3-MoE), read and validated.

Qwen3-MoE replaces every decoder layer's MLP with a sparse block: a router (`mlp.gate`, a
[num_experts, hidden] linear) picks `num_experts_per_tok` experts per token (softmax over all
experts in float32, top-k, optionally renormalised: `norm_topk_prob`), and each expert is a
SwiGLU MLP of width `moe_intermediate_size`. Layers listed in `mlp_only_layers`, or skipped by
`decoder_sparse_step`, keep a dense MLP instead; loraplex serves only all-sparse models (every
released Qwen3-MoE checkpoint is one) and refuses the rest by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

MOE_ARCHITECTURES = ("Qwen3MoeForCausalLM",)


@dataclass(frozen=True)
class MoeConfig:
    """Router and expert sizes of a sparse MLP (the same in every layer)."""

    num_experts: int
    top_k: int                     # num_experts_per_tok
    intermediate_size: int         # moe_intermediate_size: each expert's MLP width
    norm_topk_prob: bool           # renormalise the top-k probabilities to sum to 1

    def expert_shapes(self, hidden_size: int) -> dict[str, tuple[int, int, int]]:
        """(num_experts, in_features, out_features) of each fused expert parameter
        (transformers 5's `mlp.experts.gate_up_proj` and `mlp.experts.down_proj`)."""
        e, i = self.num_experts, self.intermediate_size
        return {"gate_up_proj": (e, hidden_size, 2 * i), "down_proj": (e, i, hidden_size)}


def parse_moe(raw: dict[str, Any], architecture: str, source: str) -> MoeConfig | None:
    """The MoeConfig of a MoE architecture's config.json, None for a dense one; ValueError
    naming the field for what is not served."""
    if architecture not in MOE_ARCHITECTURES:
        return None
    try:    # transformers 5 saves num_experts as num_local_experts (its attribute_map)
        num_experts = int(raw["num_experts"] if "num_experts" in raw else raw["num_local_experts"])
        top_k = int(raw["num_experts_per_tok"])
        width = int(raw["moe_intermediate_size"])
    except KeyError as missing:
        field = "num_experts" if missing.args[0] == "num_local_experts" else missing.args[0]
        raise ValueError(f"{source}: {architecture} needs {field}") from None
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"{source}: num_experts_per_tok={top_k} must be between 1 and num_experts={num_experts}")
    if raw.get("mlp_only_layers") or int(raw.get("decoder_sparse_step", 1)) != 1:
        raise ValueError(f"{source}: dense MLP layers among the sparse ones (mlp_only_layers="
                         f"{raw.get('mlp_only_layers')}, decoder_sparse_step={raw.get('decoder_sparse_step', 1)}) "
                         "are not supported; loraplex serves Qwen3-MoE models whose every layer is sparse")
    return MoeConfig(num_experts=num_experts, top_k=top_k, intermediate_size=width,
                     norm_topk_prob=bool(raw.get("norm_topk_prob", False)))

"""Types shared between the adapter store and the engine's LoRA slot pool (no torch models)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

# Sub-module names a LoRA may target in a Llama-family decoder layer (qkv_proj, gate_up_proj:
# Phi-3's fused modules; the served base's BaseSpec.module_shapes says which it has).
ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj", "gate_up_proj")
LORA_TARGET_MODULES = ATTENTION_MODULES + MLP_MODULES


@dataclass(frozen=True)
class BaseSpec:
    """What the served base model looks like, as far as adapter validation needs to know.

    module_shapes maps a sub-module name (e.g. "q_proj") to (in_features, out_features);
    it is the same in every layer of a Llama-family decoder.
    """

    fingerprint: str
    architecture: str
    num_layers: int
    module_shapes: dict[str, tuple[int, int]]
    quantization: str = "none"
    vocab_size: int = 0          # rows of embed_tokens / lm_head (0: unknown, vocabulary adapters refused)
    # MoE bases: PEFT target_parameters name (`gate_up_proj`, `down_proj` of mlp.experts) ->
    # (num_experts, in_features, out_features); empty for a dense base
    expert_shapes: dict[str, tuple[int, int, int]] = field(default_factory=dict)

    @property
    def hidden_size(self) -> int:
        return self.module_shapes["o_proj"][1]


@dataclass(frozen=True)
class LoraConfigInfo:
    """The parts of a PEFT `adapter_config.json` that serving needs (validated)."""

    rank: int
    lora_alpha: float
    use_rslora: bool
    target_modules: tuple[str, ...]
    peft_type: str = "LORA"
    base_model: str | None = None
    base_fingerprint: str | None = None

    @property
    def scaling(self) -> float:
        """PEFT's scale: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        return self.lora_alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


@dataclass(frozen=True)
class VocabWeights:
    """An adapter's own vocabulary-side tensors (each None when absent), float tensors.

    embed_lora:    PEFT lora_embedding_A [r, vocab], lora_embedding_B [hidden, r].
    lm_head_lora:  lora_A [r, hidden], lora_B [vocab, r].
    embed_table:   modules_to_save embed_tokens weight [vocab, hidden] (replaces the base's).
    lm_head_table: modules_to_save lm_head weight [vocab, hidden] (replaces the base's).
    """

    embed_lora: tuple[torch.Tensor, torch.Tensor] | None = None
    lm_head_lora: tuple[torch.Tensor, torch.Tensor] | None = None
    embed_table: torch.Tensor | None = None
    lm_head_table: torch.Tensor | None = None

    def tensors(self) -> list[torch.Tensor]:
        held = [*(self.embed_lora or ()), *(self.lm_head_lora or ()), self.embed_table, self.lm_head_table]
        return [t for t in held if t is not None]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors())


@dataclass(frozen=True)
class LoadedAdapter:
    """An adapter in host memory, ready to be copied into a device slot.

    weights maps (layer_idx, module name) to (A, B) with A: [rank, in_features] and
    B: [out_features, rank] (PEFT's lora_A.weight / lora_B.weight layouts), float tensors.
    vocab: the adapter's embed_tokens / lm_head LoRA and modules_to_save tables, or None.
    magnitudes (DoRA only): (layer_idx, module) -> m [out_features] float32, as trained.
    dora_scales (DoRA only): (layer_idx, module) -> m / ||W + scale * B A|| (row norms over
    in_features of the served base's dequantized W) [out_features] float32: the per-output
    factor applied after base + delta. Computed once per adapter version when it is loaded
    into host memory (the engine's load finisher); nbytes counts both.
    """

    key: str                                                  # "name@version"
    config: LoraConfigInfo
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]
    nbytes: int
    magnitudes: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)
    dora_scales: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)
    vocab: VocabWeights | None = None          # embedding / lm_head LoRA, modules_to_save tables
    # MoE expert LoRA (PEFT target_parameters): (layer_idx, "gate_up_proj" | "down_proj") ->
    # (A [num_experts * r, in_features], B [out_features, r * num_experts]), PEFT's stacked layout
    experts: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    @property
    def is_dora(self) -> bool:
        return bool(self.magnitudes)

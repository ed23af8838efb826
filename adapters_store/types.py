"""Types shared between the adapter store and the engine's LoRA slot pool (no torch models)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

# Sub-module names a LoRA may target in a Llama-family decoder layer.
ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
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
class LoadedAdapter:
    """An adapter in host memory, ready to be copied into a device slot.

    weights maps (layer_idx, module name) to (A, B) with A: [rank, in_features] and
    B: [out_features, rank] (PEFT's lora_A.weight / lora_B.weight layouts), float tensors.
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

    @property
    def is_dora(self) -> bool:
        return bool(self.magnitudes)

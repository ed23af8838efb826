"""A model projection: one base linear (maybe fused from several HF modules) plus a LoRA hook."""

from __future__ import annotations

from typing import Protocol

import torch

from ..lora.delta import LoraStep
from .base import QuantizedLinear


class LoraHook(Protocol):
    """Adds the step's per-token LoRA deltas to a projection's output."""

    def add_delta(self, x: torch.Tensor, y: torch.Tensor, step: LoraStep) -> None:
        """y += delta in place; x [T, in_features], y [T, out_features]."""
        ...


class ProjLinear(torch.nn.Module):
    """A base linear (possibly fused from several HF modules) plus an optional LoRA delta hook.

    sub_names are the HF module names fused here, in output order (e.g. ("q_proj", "k_proj",
    "v_proj")), and out_sizes their output widths, so a LoRA slot pool can place each module's
    delta in its column range [sum(out_sizes[:i]), sum(out_sizes[:i + 1])).
    """

    def __init__(self, base: QuantizedLinear, layer_idx: int, sub_names: tuple[str, ...],
                 out_sizes: tuple[int, ...]):
        super().__init__()
        if len(sub_names) != len(out_sizes) or sum(out_sizes) != base.out_features:
            raise ValueError(f"layer {layer_idx} {'/'.join(sub_names)}: out_sizes {out_sizes} do "
                             f"not add up to the base's {base.out_features} outputs")
        self.base = base
        self.layer_idx = layer_idx
        self.sub_names = tuple(sub_names)
        self.out_sizes = tuple(out_sizes)
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.lora: LoraHook | None = None
        self.base_linear = base.linear    # a plain attribute: self.base goes through Module.__getattr__

    def forward(self, x: torch.Tensor, lora: LoraStep | None) -> torch.Tensor:
        """x [T, in_features] -> [T, out_features]; lora: the step's prepared routing, None when
        no token of the step uses an adapter."""
        y = self.base_linear(x)
        if lora is not None and self.lora is not None:
            self.lora.add_delta(x, y, lora)
        return y

    __call__ = forward    # no nn.Module hooks on the hot path (saves ~2 us per call)

    def extra_repr(self) -> str:
        return f"layer={self.layer_idx}, modules={'+'.join(self.sub_names)}, out={self.out_sizes}"

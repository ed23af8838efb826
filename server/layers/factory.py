"""Build a base linear layer for a quantization method (the module swap point)."""

from __future__ import annotations

from typing import Callable

import torch

from .base import QuantizedLinear, QuantSpec

Builder = Callable[[torch.Tensor, "torch.Tensor | None", QuantSpec], QuantizedLinear]


def _builder(method: str) -> Builder:
    # Imports are lazy so that `--quantize none` never imports bitsandbytes or hqq.
    if method == "none":
        from .dense import DenseLinear
        return DenseLinear
    raise ValueError(f"quantization backend {method!r} is not available")


def build_linear(weight: torch.Tensor, bias: torch.Tensor | None, spec: QuantSpec) -> QuantizedLinear:
    """weight: [out_features, in_features] float checkpoint tensor; quantized here if asked."""
    return _builder(spec.method)(weight, bias, spec)

"""`--quantize none`: plain float32 / bfloat16 / float16 weights."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import QuantizedLinear, QuantSpec


class DenseLinear(QuantizedLinear):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, spec: QuantSpec):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        dtype, device = spec.compute_dtype, spec.device
        self.weight = torch.nn.Parameter(weight.to(device=device, dtype=dtype), requires_grad=False)
        self.bias = None if bias is None else torch.nn.Parameter(
            bias.to(device=device, dtype=dtype), requires_grad=False)

    def apply(self, x: torch.Tensor) -> torch.Tensor:  # [T, in] -> [T, out]
        return F.linear(x, self.weight, self.bias)

    def weight_bytes(self) -> int:
        total = self.weight.numel() * self.weight.element_size()
        if self.bias is not None:
            total += self.bias.numel() * self.bias.element_size()
        return total

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight.data

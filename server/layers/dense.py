"""`--quantize none`: plain float32 / bfloat16 / float16 weights.

On CPU (float32/bfloat16) the weight is kept prepacked for oneDNN (see cpu_gemm.py) unless
the spec asks for `linear_kernel="aten"`; otherwise it is a plain tensor used by `F.linear`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import QuantizedLinear, QuantSpec
from .cpu_gemm import pack_weight, packed_linear, unpack_weight, use_onednn


class DenseLinear(QuantizedLinear):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, spec: QuantSpec):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        dtype, device = spec.compute_dtype, spec.device
        weight = weight.to(device=device, dtype=dtype)
        self.bias = None if bias is None else torch.nn.Parameter(
            bias.to(device=device, dtype=dtype), requires_grad=False)
        self.packed = use_onednn(spec.linear_kernel, dtype, device)
        self._element_size = weight.element_size()
        if self.packed:
            # An opaque oneDNN tensor: a plain attribute, not a Parameter (state_dict/`.to()`
            # do not apply to it). The dense copy is dropped; unpack_weight restores it exactly.
            self.weight = pack_weight(weight)
        else:
            self.weight = torch.nn.Parameter(weight, requires_grad=False)

    def linear(self, x: torch.Tensor) -> torch.Tensor:  # [T, in] -> [T, out]
        if self.packed:
            return packed_linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)

    def weight_bytes(self) -> int:
        total = self.out_features * self.in_features * self._element_size
        if self.bias is not None:
            total += self.bias.numel() * self.bias.element_size()
        return total

    def dequantized_weight(self) -> torch.Tensor:
        return unpack_weight(self.weight) if self.packed else self.weight.data

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, "
                f"kernel={'onednn' if self.packed else 'aten'}")

"""A fused projection kept as separately quantized parts (outputs concatenated)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .base import QuantizedLinear


class ConcatLinear(QuantizedLinear):
    """[q; k; v]-style fusion for backends whose quantization of a concatenated weight would
    differ from quantizing each part (HQQ, bnb 4-bit double quant): each part keeps the exact
    quantized data transformers would hold for that projection."""

    def __init__(self, parts: Sequence[QuantizedLinear]):
        super().__init__()
        if len({p.in_features for p in parts}) != 1:
            raise ValueError("fused parts must share in_features")
        self.parts = torch.nn.ModuleList(parts)
        self.in_features = parts[0].in_features
        self.out_features = sum(p.out_features for p in parts)

    def linear(self, x: torch.Tensor) -> torch.Tensor:  # [T, in] -> [T, sum(out_i)]
        return torch.cat([p.linear(x) for p in self.parts], dim=-1)   # each part routes itself

    library_linear = linear

    def kernel_candidates(self) -> dict:
        return {}                                                    # the parts are chosen

    def stream_bytes(self) -> int:
        return sum(p.stream_bytes() for p in self.parts)

    def weight_bytes(self) -> int:
        return sum(p.weight_bytes() for p in self.parts)

    def dequantized_weight(self) -> torch.Tensor:
        return torch.cat([p.dequantized_weight() for p in self.parts], dim=0)  # [sum(out_i), in]

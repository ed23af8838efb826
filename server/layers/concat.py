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
        self.joined: tuple | None = None      # (extension module, QuantPack, bias): see join_native

    def join_native(self) -> bool:
        """After the parts' kernel routes are set: when every part keeps a fused-kernel pack of
        its own (not the library's data) and the packs agree in format, stack them into one
        pack (each part's pack becomes a view into it), so rows every part serves with "native"
        run one fused GEMM instead of one per part. Each output row's sum is the one its
        part computes."""
        from ..kernels.quant import join_packs, joinable

        self.joined = None
        kernels = [p.native_kernel for p in self.parts]
        if len(kernels) < 2 or any(k is None for k in kernels) or not joinable([k[1] for k in kernels]):
            return False
        joined, views = join_packs([k[1] for k in kernels])
        biases = [k[2] for k in kernels]
        bias = None
        if any(b is not None for b in biases):
            bias = torch.cat([torch.zeros(p.out_features) if b is None else b
                              for p, b in zip(self.parts, biases)])
        for part, (module, _, part_bias), view in zip(self.parts, kernels, views):
            part.native_kernel = (module, view, part_bias)
        self.joined = (kernels[0][0], joined, bias)
        return True

    def joined_native(self, rows: int) -> tuple | None:
        """(QuantPack, bias) of the joined pack when every part serves `rows` rows natively."""
        if self.joined is None or any(p.served_route(rows) != "native" for p in self.parts):
            return None
        return self.joined[1:]

    def linear(self, x: torch.Tensor) -> torch.Tensor:  # [T, in] -> [T, sum(out_i)]
        joined = self.joined_native(x.shape[0])
        if joined is not None:
            from ..kernels.quant import quant_linear

            module, pack, bias = self.joined
            return quant_linear(module, pack, x, bias)
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

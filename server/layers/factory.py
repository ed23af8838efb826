"""Build a base linear layer for a quantization method (the module swap point)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Callable

import torch

from .base import QuantizedLinear, QuantSpec

Builder = Callable[[torch.Tensor, "torch.Tensor | None", QuantSpec], QuantizedLinear]

BNB_4BIT_METHODS = ("bnb-nf4", "bnb-fp4")
HQQ_METHODS = ("hqq-2bit", "hqq-3bit", "hqq-4bit", "hqq-8bit")


def _builder(method: str) -> Builder:
    # Imports are lazy so that `--quantize none` never imports bitsandbytes or hqq.
    if method == "none":
        from .dense import DenseLinear
        return DenseLinear
    if method in BNB_4BIT_METHODS:
        from .bnb import Bnb4bitLinear
        return Bnb4bitLinear
    if method == "bnb-int8":
        from .bnb import BnbInt8Linear
        return BnbInt8Linear
    if method in HQQ_METHODS:
        from .hqq import HqqLinear
        return HqqLinear
    if method == "eetq":
        from .eetq import EetqLinear
        return EetqLinear
    raise ValueError(f"quantization backend {method!r} is not available")


def build_linear(weight: torch.Tensor, bias: torch.Tensor | None, spec: QuantSpec) -> QuantizedLinear:
    """weight: [out_features, in_features] float checkpoint tensor; quantized here if asked."""
    return _builder(spec.method)(weight, bias, spec)


def fuses_exactly(spec: QuantSpec, in_features: int) -> bool:
    """True when quantizing [W_1; W_2; ...] stores exactly what quantizing each W_i does.

    Row-local schemes (int8 per row) always fuse exactly; bnb 4-bit does when its 64-blocks do
    not straddle rows and absmax is not double-quantized (double quant uses a tensor-wide mean);
    HQQ never guarantees it (its optimizer stops on the tensor-wide mean error).
    """
    if spec.method in ("none", "eetq", "bnb-int8"):
        return True
    if spec.method in BNB_4BIT_METHODS:
        from .bnb import BNB_4BIT_BLOCKSIZE
        return in_features % BNB_4BIT_BLOCKSIZE == 0 and not spec.bnb_double_quant
    return False


def build_fused_linear(weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None],
                       spec: QuantSpec) -> QuantizedLinear:
    """One layer computing [x @ W_1^T + b_1, x @ W_2^T + b_2, ...] (e.g. q/k/v or gate/up).

    Quantizes the concatenated weight once where that is exact (`fuses_exactly`), otherwise
    keeps separately quantized parts, so the stored data always equals per-projection
    quantization (what transformers does). weights: each [out_i, in]; biases: each [out_i] or
    None.
    """
    if len(weights) != len(biases):
        raise ValueError(f"got {len(weights)} weights but {len(biases)} biases")
    in_features = weights[0].shape[1]
    if not fuses_exactly(spec, in_features):
        from .concat import ConcatLinear
        return ConcatLinear([build_linear(w, b, spec) for w, b in zip(weights, biases)])
    fused_bias = None
    if any(b is not None for b in biases):
        fused_bias = torch.cat([w.new_zeros(w.shape[0]) if b is None else b
                                for w, b in zip(weights, biases)])
    return build_linear(torch.cat(list(weights), dim=0), fused_bias, spec)

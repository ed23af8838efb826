"""`--quantize none`: plain float32 / bfloat16 / float16 weights.

Two kernels on CPU (float32/bfloat16): "onednn", the weight prepacked for oneDNN (cpu_gemm.py),
and "aten", `F.linear` on the plain weight. `--linear-kernel onednn|aten` keeps only that
one; `auto` keeps both until layers/linear_choice.py has measured them on this machine and
calls `set_kernel_routes`, which drops the representation it did not pick (one choice per
layer, not per row count: two copies of a float weight would double its memory).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Kernel, QuantizedLinear, QuantSpec
from .cpu_gemm import pack_weight, packed_linear, unpack_weight, use_onednn


class DenseLinear(QuantizedLinear):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, spec: QuantSpec):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        dtype, device = spec.compute_dtype, spec.device
        self.compute_dtype = dtype
        weight = weight.to(device=device, dtype=dtype)
        self.bias = None if bias is None else torch.nn.Parameter(
            bias.to(device=device, dtype=dtype), requires_grad=False)
        onednn = use_onednn(spec.linear_kernel, dtype, device)
        self._element_size = weight.element_size()
        # An opaque oneDNN tensor: a plain attribute, not a Parameter (state_dict/`.to()` do not
        # apply to it); unpack_weight restores the dense weight exactly.
        self.packed_weight = pack_weight(weight) if onednn else None
        keep_dense = not onednn or spec.linear_kernel not in ("onednn",)
        self.weight = torch.nn.Parameter(weight, requires_grad=False) if keep_dense else None
        if onednn and spec.linear_kernel == "onednn":
            self.set_kernel_routes(((2**62, "onednn"),))

    @property
    def packed(self) -> bool:
        """True when the layer serves with the prepacked oneDNN weight."""
        return self.packed_weight is not None and (self.weight is None or self._serves("onednn"))

    def _serves(self, name: str) -> bool:
        return any(kernel == name for _, kernel in self.route_names)

    def library_linear(self, x: torch.Tensor) -> torch.Tensor:  # [T, in] -> [T, out]
        if self.weight is None:
            return packed_linear(x, self.packed_weight, self.bias)
        return F.linear(x, self.weight, self.bias)

    def kernel_candidates(self) -> dict[str, Kernel]:
        candidates: dict[str, Kernel] = {}
        if self.weight is not None:
            candidates["aten"] = lambda x: F.linear(x, self.weight, self.bias)
        if self.packed_weight is not None:
            candidates["onednn"] = lambda x: packed_linear(x, self.packed_weight, self.bias)
        return candidates

    def set_kernel_routes(self, routes: tuple[tuple[int, str], ...]) -> None:
        super().set_kernel_routes(routes)
        names = {name for _, name in routes}
        if "onednn" not in names:
            self.packed_weight = None
        if "aten" not in names and self.packed_weight is not None:
            self.weight = None

    def weight_bytes(self) -> int:
        total = self.out_features * self.in_features * self._element_size
        if self.bias is not None:
            total += self.bias.numel() * self.bias.element_size()
        return total

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight.data if self.weight is not None else unpack_weight(self.packed_weight)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, "
                f"kernel={'onednn' if self.packed else 'aten'}")

"""`--quantize eetq`: int8 per-output-channel weight-only quantization (EETQ's scheme).

With the `eetq` package on CUDA and a float16 compute dtype the layer runs EETQ's
`w8_a16_gemm` kernel; everywhere else it runs the pure-torch path in `eetq_ref` (same scheme:
symmetric int8 per output row, scale = absmax / 127, activations stay in the compute dtype).
The choice is made once, at build time.
"""

from __future__ import annotations

import importlib.util

import torch

from .base import QuantizedLinear, QuantSpec
from .eetq_ref import dequantize_int8_per_channel, int8_weight_only_linear, quantize_int8_per_channel


def eetq_kernels_usable(spec: QuantSpec) -> bool:
    """EETQ's kernels take float16 activations on CUDA and ship only as a CUDA wheel."""
    return (spec.device.startswith("cuda") and spec.compute_dtype == torch.float16
            and torch.cuda.is_available() and importlib.util.find_spec("EETQ") is not None)


class EetqLinear(QuantizedLinear):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, spec: QuantSpec):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.compute_dtype = spec.compute_dtype
        self.uses_eetq_kernel = eetq_kernels_usable(spec)
        if self.uses_eetq_kernel:
            self._init_eetq(weight, spec.device)
        else:
            w_int8, scale = quantize_int8_per_channel(weight)
            self.register_buffer("w_int8", w_int8.to(spec.device))                  # [out, in]
            self.register_buffer("scale", scale.to(spec.device))    # [out] float32
        self.register_buffer("bias", None if bias is None else
                             bias.to(device=spec.device, dtype=spec.compute_dtype))

    def _init_eetq(self, weight: torch.Tensor, device: str) -> None:
        from EETQ import quant_weights, w8_a16_gemm

        self._w8_a16_gemm = w8_a16_gemm

        w_t = weight.to(torch.float16).t().contiguous().cpu()                       # [in, out]
        w_processed, scale = quant_weights(w_t, torch.int8, False)
        self.register_buffer("w_processed", w_processed.to(device))  # kernel's interleaved layout
        self.register_buffer("scale", scale.to(device, torch.float16))               # [out]

    def library_linear(self, x: torch.Tensor) -> torch.Tensor:  # [T, in] -> [T, out]
        if self.uses_eetq_kernel:
            y = self._w8_a16_gemm(x, self.w_processed, self.scale)
            return y if self.bias is None else y + self.bias
        return int8_weight_only_linear(x, self.w_int8, self.scale, self.bias)

    def native_pack(self):
        from ..kernels.quant import pack_int8_rows

        if self.uses_eetq_kernel:
            return None
        bias = None if self.bias is None else self.bias.float().contiguous()
        return pack_int8_rows(self.w_int8, self.scale), bias

    def weight_bytes(self) -> int:
        stored = [self.w_processed if self.uses_eetq_kernel else self.w_int8, self.scale, self.bias]
        return sum(t.numel() * t.element_size() for t in stored if t is not None)

    def dequantized_weight(self) -> torch.Tensor:
        if self.uses_eetq_kernel:
            # The kernel's layout is private: multiply by the identity instead (exact: one term
            # per output, then the same single rounding to float16 as a dequantize).
            eye = torch.eye(self.in_features, dtype=torch.float16, device=self.scale.device)
            return self._w8_a16_gemm(eye, self.w_processed, self.scale).t().contiguous()  # [out, in]
        return dequantize_int8_per_channel(self.w_int8, self.scale, self.compute_dtype)

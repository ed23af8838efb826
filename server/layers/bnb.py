"""`--quantize bnb-nf4 | bnb-fp4 | bnb-int8`: bitsandbytes 4-bit (QLoRA) and LLM.int8 layers.

Quantization is bitsandbytes' own (`quantize_4bit`, `int8_vectorwise_quant`) applied to the
checkpoint weight exactly as transformers' `BitsAndBytesConfig` loading does, so the stored
data is bit-identical to what a PEFT/transformers QLoRA model holds (tests/quant_oracle.py).
"""

from __future__ import annotations

import torch

from .base import QuantizedLinear, QuantSpec

BNB_4BIT_BLOCKSIZE = 64   # transformers' default for bnb_4bit; blocks never straddle rows
                          # when in_features % 64 == 0


def _tensor_bytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _cast_bias(bias: torch.Tensor | None, spec: QuantSpec) -> torch.Tensor | None:
    return None if bias is None else bias.to(device=spec.device, dtype=spec.compute_dtype)


class Bnb4bitLinear(QuantizedLinear):
    """NF4/FP4 blockwise 4-bit weights (blocksize 64, uint8 storage), optional double quant."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, spec: QuantSpec):
        super().__init__()
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnbf

        self.out_features, self.in_features = weight.shape
        self.compute_dtype = spec.compute_dtype
        self.quant_type = spec.method.removeprefix("bnb-")          # "nf4" | "fp4"
        self.method_tag = f"-{self.quant_type}{'-dq' if spec.bnb_double_quant else ''}"
        # transformers quantizes the weight as loaded, i.e. already cast to the model dtype.
        w = weight.to(device=spec.device, dtype=spec.compute_dtype).contiguous()
        w_4bit, self.quant_state = bnbf.quantize_4bit(
            w, blocksize=BNB_4BIT_BLOCKSIZE, compress_statistics=spec.bnb_double_quant,
            quant_type=self.quant_type, quant_storage=torch.uint8)
        self.register_buffer("w_4bit", w_4bit)       # [out * in / 2, 1] uint8, two codes a byte
        self.register_buffer("bias", _cast_bias(bias, spec))
        self._matmul_4bit = bnb.matmul_4bit
        self._dequantize_4bit = bnbf.dequantize_4bit

    def library_linear(self, x: torch.Tensor) -> torch.Tensor:  # [T, in] -> [T, out]
        return self._matmul_4bit(x, self.w_4bit, quant_state=self.quant_state, bias=self.bias)

    def native_pack(self):
        from ..kernels.quant import pack_bnb_4bit

        pack = pack_bnb_4bit(self.w_4bit, self.quant_state, self.out_features, self.in_features)
        return None if pack is None else (pack, self.bias)

    def weight_bytes(self) -> int:
        state = self.quant_state
        total = _tensor_bytes(self.w_4bit, self.bias, state.absmax, state.code)
        if state.nested:
            total += _tensor_bytes(state.state2.absmax, state.state2.code, state.offset)
        return total

    def dequantized_weight(self) -> torch.Tensor:
        return self._dequantize_4bit(self.w_4bit, self.quant_state).to(self.compute_dtype)


class BnbInt8Linear(QuantizedLinear):
    """LLM.int8: int8 row-wise weights; activations quantized per token, outlier columns
    (|x| > threshold) computed in float against the dequantized weight columns.

    Runs the same ops as `bnb.matmul` / `Linear8bitLt` inference (has_fp16_weights=False),
    called directly to skip autograd and bnb's per-call float16-cast warning.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, spec: QuantSpec):
        super().__init__()
        import bitsandbytes.functional as bnbf

        self.out_features, self.in_features = weight.shape
        self.compute_dtype = spec.compute_dtype
        self.threshold = float(spec.bnb_int8_threshold)
        # Int8Params quantizes the float16-cast weight: CB int8 [out, in], SCB absmax [out].
        w16 = weight.to(device=spec.device, dtype=torch.float16).contiguous()
        w_int8, row_absmax, _ = bnbf.int8_vectorwise_quant(w16)
        self.register_buffer("w_int8", w_int8)
        self.register_buffer("row_absmax", row_absmax)
        self.register_buffer("bias", _cast_bias(bias, spec))
        self._vectorwise_quant = bnbf.int8_vectorwise_quant
        self._vectorwise_dequant = bnbf.int8_vectorwise_dequant

    def library_linear(self, x: torch.Tensor) -> torch.Tensor:  # [T, in] -> [T, out]
        ops = torch.ops.bitsandbytes
        x_int8, x_absmax, outlier_cols = self._vectorwise_quant(
            x.to(torch.float16), threshold=self.threshold)
        if self.threshold > 0.0:
            y, _ = ops.int8_mixed_scaled_mm(x, x_int8, self.w_int8, x_absmax, self.row_absmax,
                                            outlier_cols, self.bias)
            return y
        return ops.int8_scaled_mm.default(x_int8, self.w_int8, x_absmax, self.row_absmax,
                                          bias=self.bias, dtype=x.dtype)

    def native_pack(self):
        """LLM.int8's weight (q * absmax / 127) for the weight-only fused kernel: no activation
        rounding and no outlier split, so it differs from library_linear by LLM.int8's own error."""
        from ..kernels.quant import pack_int8_rows

        return pack_int8_rows(self.w_int8, self.row_absmax.float() / 127.0), self.bias

    def weight_bytes(self) -> int:
        return _tensor_bytes(self.w_int8, self.row_absmax, self.bias)

    def dequantized_weight(self) -> torch.Tensor:
        return self._vectorwise_dequant(self.w_int8, self.row_absmax).to(self.compute_dtype)

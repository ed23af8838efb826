"""`--quantize hqq-{2,3,4,8}bit`: HQQ group-wise quantization (per-group scale and zero).

Quantization is `hqq.core.quantize.HQQLinear` with `BaseQuantizeConfig(nbits, group_size,
axis=1)`, the config transformers' `HqqConfig` builds. The matmul kernel is chosen once per
layer at build time (`select_hqq_kernel`): on CUDA GemLite (any nbits in 1/2/4/8, float16) or
torchao int4 (4-bit, bfloat16) when installed; otherwise HQQ's PyTorch path (dequantize the
packed weight, then one matmul) -- the only one that runs on CPU.

Note: HQQ's optimizer stops early on the *whole tensor's* mean error, so quantizing a fused
[q; k; v] weight can give slightly different groups than quantizing q, k, v one by one (as
transformers does). Build fused projections with `factory.build_fused_linear`, which keeps
HQQ parts separate.
"""

from __future__ import annotations

import importlib.util

import torch

from .base import QuantizedLinear, QuantSpec

HQQ_KERNELS = ("pytorch", "gemlite", "torchao_int4")


def hqq_nbits(method: str) -> int:
    """'hqq-4bit' -> 4."""
    return int(method.removeprefix("hqq-").removesuffix("bit"))


def select_hqq_kernel(spec: QuantSpec) -> str:
    """The fastest HQQ matmul usable for this spec on this platform (one of HQQ_KERNELS)."""
    if not (spec.device.startswith("cuda") and torch.cuda.is_available()):
        return "pytorch"
    nbits = hqq_nbits(spec.method)
    if (spec.compute_dtype == torch.float16 and nbits in (2, 4, 8)
            and importlib.util.find_spec("gemlite") is not None):
        return "gemlite"
    if (spec.compute_dtype == torch.bfloat16 and nbits == 4
            and importlib.util.find_spec("torchao") is not None):
        return "torchao_int4"
    return "pytorch"


def hqq_quant_config(nbits: int, group_size: int) -> dict:
    """HQQ's quant config exactly as transformers' HqqConfig(nbits, group_size) makes it."""
    from hqq.core.quantize import BaseQuantizeConfig

    return BaseQuantizeConfig(nbits=nbits, group_size=group_size, view_as_float=False, axis=1)


class HqqLinear(QuantizedLinear):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, spec: QuantSpec):
        super().__init__()
        from hqq.core.quantize import HQQLinear

        self.out_features, self.in_features = weight.shape
        if self.in_features % spec.hqq_group_size:
            raise ValueError(f"hqq group_size {spec.hqq_group_size} must divide in_features "
                             f"{self.in_features}; pick a group size that divides it")
        self.compute_dtype = spec.compute_dtype
        self.method_tag = f"-{hqq_nbits(spec.method)}bit"
        float_linear = torch.nn.Linear(self.in_features, self.out_features, bias=bias is not None)
        float_linear.weight.data = weight.to(spec.compute_dtype)
        if bias is not None:
            float_linear.bias.data = bias.to(spec.compute_dtype)
        self.hqq = HQQLinear(float_linear, hqq_quant_config(hqq_nbits(spec.method),
                                                            spec.hqq_group_size),
                             compute_dtype=spec.compute_dtype, device=spec.device)
        self.kernel = select_hqq_kernel(spec)
        self.fast = None if self.kernel == "pytorch" else _patch_fast_kernel(self.hqq, self.kernel)

    def library_linear(self, x: torch.Tensor) -> torch.Tensor:  # [T, in] -> [T, out]
        if self.fast is not None:
            return self.fast(x)
        y = torch.matmul(x, self.hqq.dequantize().t())              # [T, out]
        return y if self.hqq.bias is None else y + self.hqq.bias

    def native_pack(self):
        from ..kernels.quant import pack_hqq

        if self.fast is not None:
            return None
        pack = pack_hqq(self.hqq, self.out_features, self.in_features)
        bias = self.hqq.bias
        return None if pack is None else (pack, None if bias is None else bias.detach().float().contiguous())

    def weight_bytes(self) -> int:
        meta = self.hqq.meta
        stored = [self.hqq.W_q, meta.get("scale"), meta.get("zero"), self.hqq.bias]
        if self.fast is not None:  # the fast kernel's repacked copy is resident as well
            stored += list(self.fast.parameters()) + list(self.fast.buffers())
        stored = [t for t in stored if torch.is_tensor(t)]
        total = sum(t.numel() * t.element_size() for t in stored)
        if self.native_kernel is not None:   # the kernel's own copies (nibbles; joined scales, zeros)
            pack = self.native_kernel[1]
            held = {t.untyped_storage().data_ptr() for t in stored}
            total += sum(t.numel() * t.element_size() for t in (pack.codes, pack.scales, pack.zeros)
                         if t is not None and t.untyped_storage().data_ptr() not in held)
        return total

    def dequantized_weight(self) -> torch.Tensor:
        return self.hqq.dequantize().to(self.compute_dtype)         # [out, in]


def _patch_fast_kernel(layer, kernel: str) -> torch.nn.Module:
    """Wrap a quantized HQQLinear in the GemLite / torchao module (CUDA only)."""
    if kernel == "gemlite":
        from hqq.backends.gemlite import patch_hqq_to_gemlite

        return patch_hqq_to_gemlite(layer, None)
    from hqq.backends.torchao import patch_hqq_to_aoint4

    return patch_hqq_to_aoint4(layer, None)

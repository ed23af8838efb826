"""Pure-torch EETQ scheme: symmetric per-output-channel int8 weights, float activations.

This is both the CPU/no-eetq implementation of `--quantize eetq` and the reference twin that
the eetq CUDA kernel (`w8_a16_gemm`) is tested against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

INT8_MAX = 127


def quantize_int8_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [out, in] float -> (int8 [out, in], float32 scale [out]).

    scale = absmax(row) / 127; q = round(w / scale) (round half to even), so |q| <= 127.
    All-zero rows get scale 1 (their q is 0 either way).
    """
    w = weight.float()                                          # [out, in]
    absmax = w.abs().amax(dim=1)                                # [out]
    scale = torch.where(absmax > 0, absmax / INT8_MAX, torch.ones_like(absmax))
    w_int8 = torch.round(w / scale[:, None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return w_int8, scale


def int8_weight_only_linear(x: torch.Tensor, w_int8: torch.Tensor, scale: torch.Tensor,
                            bias: torch.Tensor | None) -> torch.Tensor:
    """The serving path: y = (x @ W_int8^T) * scale + b, all arithmetic in x.dtype.

    x: [T, in] compute dtype; w_int8: [out, in]; scale: [out] (any float dtype).
    The int8 -> float cast is exact (|q| <= 127), so the only rounding is the matmul's and the
    one multiply by the per-row scale.
    """
    y = F.linear(x, w_int8.to(x.dtype))                         # [T, out]
    y = y * scale.to(x.dtype)
    if bias is not None:
        y = y + bias.to(x.dtype)
    return y


def int8_weight_only_linear_ref(x: torch.Tensor, w_int8: torch.Tensor, scale: torch.Tensor,
                                bias: torch.Tensor | None) -> torch.Tensor:
    """Reference twin of `int8_weight_only_linear`: dequantize first, then a plain linear.

    Mathematically identical; differs from the serving path only by float rounding order.
    """
    weight = dequantize_int8_per_channel(w_int8, scale, x.dtype)   # [out, in]
    return F.linear(x, weight, None if bias is None else bias.to(x.dtype))


def dequantize_int8_per_channel(w_int8: torch.Tensor, scale: torch.Tensor,
                                dtype: torch.dtype) -> torch.Tensor:
    """[out, in] int8 + [out] scale -> [out, in] weight in `dtype`."""
    return (w_int8.float() * scale.float()[:, None]).to(dtype)

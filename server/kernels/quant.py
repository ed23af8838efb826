"""The packed weights the fused quantized GEMMs read, built from each backend's own data.

`QuantPack` holds one layer's weight in the layout of csrc/quant_gemm.cpp: 4-bit codes as
[out, in / 2] bytes (element 2j in the high nibble: bitsandbytes' order) with a 16-entry
value table, or 8-bit codes [out, in] (int8 or uint8); per-group float32 scales (and zeros)
[out, in / group]. Every weight dequantizes with the library's own formula in float32:

  bnb nf4/fp4   code[q] * absmax[block]           (codes and float absmax read where they lie;
                                                   nested absmax dequantized once at load)
  bnb-int8      q * absmax[row] / 127             (LLM.int8's weight; the kernel computes the
                                                   weight-only product, no activation rounding)
  eetq          q * scale[row]
  hqq 8/4/3/2   (q - zero[group]) * scale[group]  (8-bit read where it lies; 4/3/2-bit unpacked
                                                   once and stored as nibbles)

`quant_linear_4bit_ref` / `quant_linear_8bit_ref` are the kernels' pure-torch twins (same
signatures: dequantize, then F.linear); `pack_*` return None where the kernel cannot take the
layer (a group straddling rows, a non-float32 compute dtype, HQQ's quantized meta), and the
layer keeps its library path.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class QuantPack:
    """One layer's weight in the fused kernel's layout (see the module docstring)."""

    bits: int                       # 4 or 8
    codes: torch.Tensor             # [out, in / 2] uint8 (4-bit) or [out, in] int8 / uint8
    scales: torch.Tensor            # [out, in / group] float32
    zeros: torch.Tensor | None      # [out, in / group] float32 or None (= 0)
    group: int
    lut: torch.Tensor | None = None  # [16] float32 (4-bit only)
    owned: bool = False             # codes are a copy made for the kernel, not the library's data

    def nbytes(self) -> int:
        tensors = (self.codes, self.scales, self.zeros, self.lut)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def dequantize(self) -> torch.Tensor:
        """[out, in] float32 weight, the values the kernel multiplies."""
        if self.bits == 4:
            return dequantize_4bit(self.codes, self.lut, self.scales, self.zeros, self.group)
        return dequantize_8bit(self.codes, self.scales, self.zeros, self.group)


def _affine(values: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
            group: int) -> torch.Tensor:
    out, in_features = values.shape
    grouped = values.view(out, in_features // group, group)                  # [out, G, group]
    if zeros is not None:
        grouped = grouped - zeros.view(out, -1, 1)
    return (grouped * scales.view(out, -1, 1)).view(out, in_features)


def dequantize_4bit(codes: torch.Tensor, lut: torch.Tensor, scales: torch.Tensor,
                    zeros: torch.Tensor | None, group: int) -> torch.Tensor:
    """codes [out, in / 2] (high nibble first) -> [out, in] float32."""
    high, low = (codes >> 4).long(), (codes & 15).long()                      # [out, in / 2]
    values = lut[torch.stack([high, low], dim=-1).flatten(1)]                # [out, in]
    return _affine(values, scales, zeros, group)


def dequantize_8bit(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                    group: int) -> torch.Tensor:
    """codes [out, in] int8 / uint8 -> [out, in] float32."""
    return _affine(codes.float(), scales, zeros, group)


def quant_linear_4bit_ref(x: torch.Tensor, codes: torch.Tensor, lut: torch.Tensor,
                          scales: torch.Tensor, zeros: torch.Tensor | None, group: int,
                          bias: torch.Tensor | None, portable: bool) -> torch.Tensor:
    """Twin of the native quant_linear_4bit: x [T, in] -> [T, out]."""
    return F.linear(x, dequantize_4bit(codes, lut, scales, zeros, group), bias)


def quant_linear_8bit_ref(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor,
                          zeros: torch.Tensor | None, group: int, bias: torch.Tensor | None,
                          portable: bool) -> torch.Tensor:
    """Twin of the native quant_linear_8bit: x [T, in] -> [T, out]."""
    return F.linear(x, dequantize_8bit(codes, scales, zeros, group), bias)


def quant_linear(module, pack: QuantPack, x: torch.Tensor, bias: torch.Tensor | None,
                 portable: bool = False) -> torch.Tensor:
    """x [T, in] float32 -> [T, out] through the native kernel of `module` (the extension)."""
    if pack.bits == 4:
        return module.quant_linear_4bit(x, pack.codes, pack.lut, pack.scales, pack.zeros,
                                        pack.group, bias, portable)
    return module.quant_linear_8bit(x, pack.codes, pack.scales, pack.zeros, pack.group, bias,
                                    portable)


# ---- packing each backend's data ----------------------------------------------------------

def pack_bnb_4bit(w_4bit: torch.Tensor, quant_state, out_features: int,
                  in_features: int) -> QuantPack | None:
    """bitsandbytes nf4/fp4 (blockwise absmax, nested or not): codes read where they lie."""
    block = quant_state.blocksize
    if in_features % block or w_4bit.dtype != torch.uint8:
        return None                                        # a block would straddle two rows
    absmax = quant_state.absmax
    if quant_state.nested:                                 # as bitsandbytes' dequantize_4bit
        import bitsandbytes.functional as bnbf

        absmax = bnbf.dequantize_blockwise(quant_state.absmax, quant_state.state2)
        absmax = absmax + quant_state.offset
    return QuantPack(4, w_4bit.view(out_features, in_features // 2),
                     absmax.float().contiguous().view(out_features, in_features // block), None,
                     block, quant_state.code.float().contiguous())


def pack_int8_rows(w_int8: torch.Tensor, row_scale: torch.Tensor) -> QuantPack:
    """Symmetric int8 with one float scale per output row (eetq, bnb-int8 with absmax / 127)."""
    out_features, in_features = w_int8.shape
    return QuantPack(8, w_int8.contiguous(), row_scale.float().contiguous().view(out_features, 1),
                     None, in_features)


def pack_hqq(hqq_layer, out_features: int, in_features: int) -> QuantPack | None:
    """HQQ (axis=1, nbits 8/4/3/2): 8-bit codes read where they lie, others unpacked to nibbles."""
    from hqq.core.quantize import Quantizer

    meta = hqq_layer.meta
    scale, zero = meta.get("scale"), meta.get("zero")
    if (meta.get("axis") != 1 or meta.get("quant_zero") or meta.get("quant_scale")
            or not torch.is_tensor(scale) or not torch.is_tensor(zero)
            or meta.get("view_as_float")):
        return None
    group = int(meta["group_size"])
    num_groups = out_features * in_features // group
    scales = scale.detach().float().contiguous().view(out_features, in_features // group)
    zeros = zero.detach().float().contiguous().view(out_features, in_features // group)
    nbits = int(meta["nbits"])
    if nbits == 8:
        return QuantPack(8, hqq_layer.W_q.data.view(out_features, in_features), scales, zeros, group)
    if nbits not in (4, 3, 2) or group % 2:
        return None
    codes = Quantizer.unpack[meta["packing"]](hqq_layer.W_q.data, dtype=torch.uint8)[:num_groups]
    codes = codes.reshape(out_features, in_features)                        # [out, in] 0..2^b-1
    nibbles = ((codes[:, 0::2] << 4) | codes[:, 1::2]).contiguous()         # [out, in / 2]
    return QuantPack(4, nibbles, scales, zeros, group, torch.arange(16, dtype=torch.float32), owned=True)


def joinable(packs: list[QuantPack]) -> bool:
    """True when `packs` can be one weight of stacked rows (`join_packs`) without copying data
    a library holds: every pack owns its codes, and bits, group, table and zeros agree."""
    first = packs[0]
    return all(p.owned and p.bits == first.bits and p.group == first.group
               and p.codes.dtype == first.codes.dtype and (p.zeros is None) == (first.zeros is None)
               and (p.lut is None) == (first.lut is None)
               and (p.lut is None or torch.equal(p.lut, first.lut)) for p in packs)


def join_packs(packs: list[QuantPack]) -> tuple[QuantPack, list[QuantPack]]:
    """One pack of the parts' rows stacked ([sum(out_i), ...]: each output row dequantizes and
    sums exactly as in its part), and each part's pack as views into it (no second copy)."""
    def cat(tensors):
        return None if tensors[0] is None else torch.cat(tensors).contiguous()

    first = packs[0]
    joined = replace(first, codes=cat([p.codes for p in packs]), scales=cat([p.scales for p in packs]),
                     zeros=cat([p.zeros for p in packs]))
    views, row = [], 0
    for p in packs:
        rows = slice(row, row + p.codes.shape[0])
        views.append(replace(p, codes=joined.codes[rows], scales=joined.scales[rows],
                             zeros=None if joined.zeros is None else joined.zeros[rows]))
        row = rows.stop
    return joined, views

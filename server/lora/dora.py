"""DoRA served unmerged: a per-output scale after the base output plus the LoRA delta.

PEFT (peft/tuners/lora/dora.py, DoraLinearLayer) computes, for a DoRA module with magnitude m,

    y = b + (m / ||W + s B A||_row) * (W x + s B A x)

where W [out, in] is the base weight (dequantized on a quantized base), s the LoRA scale and
the norm is taken over in_features for each output row (`torch.linalg.norm(W + s BA, dim=1)`).
The factor depends only on the adapter version and the served base, so it is computed once,
when the adapter enters host memory (`DoraScaler`, the store's load finisher), and kept as
`LoadedAdapter.dora_scales`. Each step then multiplies the rows of DoRA tokens, after the
projection's base + delta, by their slot's factor (`apply_dora`); other rows are untouched.
A pure-decode step through the fused decode stack (model/decode_stack.py) applies the same
factors with the native `dora_scale_rows` (kernels/csrc/dora.cpp; twin `dora_scale_rows_ref`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Sequence

import torch

from ...adapters_store.types import LoadedAdapter


class DoraScaleError(ValueError):
    """A DoRA adapter's scale m / ||W + s BA|| is not finite on the served base."""


@dataclass(frozen=True)
class DoraRows:
    """The step's tokens that use a DoRA adapter: rows [Td] int64 and their slots [Td] int64."""

    rows: torch.Tensor
    slots: torch.Tensor


def base_bias(layer: Any) -> torch.Tensor | None:
    """The base linear's bias [out] in its compute dtype, or None (every backend's own attribute)."""
    parts = getattr(layer, "parts", None)
    if parts is not None:                                   # ConcatLinear: the parts' biases
        biases = [base_bias(part) for part in parts]
        if all(b is None for b in biases):
            return None
        return torch.cat([torch.zeros(p.out_features, dtype=layer.compute_dtype if hasattr(layer, "compute_dtype")
                                      else torch.float32) if b is None else b for p, b in zip(parts, biases)])
    hqq = getattr(layer, "hqq", None)
    bias = getattr(hqq, "bias", None) if hqq is not None else getattr(layer, "bias", None)
    return None if bias is None else bias.detach()


def dora_scale(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float,
               magnitude: torch.Tensor) -> torch.Tensor:
    """m / ||W + s B A|| per output row, float32. weight [out, in] (dequantized), lora_a [r, in],
    lora_b [out, r], magnitude [out]."""
    weight = weight.to(torch.float32)
    lora_weight = lora_b.to(torch.float32) @ lora_a.to(torch.float32)            # [out, in]
    norm = torch.linalg.norm(weight + scaling * lora_weight, dim=1)               # [out]
    return (magnitude.to(torch.float32) / norm).contiguous()


class DoraScaler:
    """The load finisher: derives `dora_scales` of a DoRA adapter from the served base.

    targets: the model's ProjLinear projections (layer_idx, sub_names, out_sizes, base). The
    base weight of a projection is dequantized only while a DoRA adapter that adapts it loads.
    """

    def __init__(self, targets: Sequence[Any]):
        self._where: dict[tuple[int, str], tuple[Any, int, int]] = {}
        for target in targets:
            start = 0
            for name, out_m in zip(target.sub_names, target.out_sizes):
                self._where[(target.layer_idx, name)] = (target, start, out_m)
                start += out_m

    def scales(self, adapter: LoadedAdapter) -> dict[tuple[int, str], torch.Tensor]:
        """(layer, module) -> m / ||W + s BA|| [out] for every module with a magnitude."""
        scaling = adapter.config.scaling
        dequantized: dict[int, torch.Tensor] = {}
        scales = {}
        for key, magnitude in adapter.magnitudes.items():
            if key not in self._where or key not in adapter.weights:
                raise DoraScaleError(f"adapter {adapter.key}: DoRA magnitude for layer {key[0]} {key[1]} "
                                     f"has no matching LoRA module on this base")
            target, start, out_m = self._where[key]
            if id(target) not in dequantized:
                dequantized[id(target)] = target.base.dequantized_weight()          # [out, in]
            weight = dequantized[id(target)][start:start + out_m]
            lora_a, lora_b = adapter.weights[key]
            scale = dora_scale(weight, lora_a, lora_b, scaling, magnitude)
            if not bool(torch.isfinite(scale).all()):
                raise DoraScaleError(f"adapter {adapter.key}: layer {key[0]} {key[1]}: m / ||W + s BA|| is not "
                                     f"finite on this base (a row of W + s BA has norm 0); it cannot be served")
            scales[key] = scale
        return scales

    def __call__(self, adapter: LoadedAdapter) -> LoadedAdapter:
        """The adapter with its dora_scales (unchanged when it is not DoRA or already has them)."""
        if not adapter.is_dora or adapter.dora_scales:
            return adapter
        scales = self.scales(adapter)
        extra = sum(s.nbytes for s in scales.values())
        return replace(adapter, dora_scales=scales, nbytes=adapter.nbytes + extra)


def dora_rows(token_slots: torch.Tensor, dora_slots: torch.Tensor) -> DoraRows:
    """token_slots [T] int64 (-1 = none), dora_slots [k] int64 -> the tokens on a DoRA slot."""
    rows = torch.nonzero(torch.isin(token_slots, dora_slots)).flatten()          # [Td]
    return DoraRows(rows=rows, slots=token_slots.index_select(0, rows))


def apply_dora(y: torch.Tensor, dora: DoraRows, scales: torch.Tensor, bias: torch.Tensor | None) -> None:
    """y [T, out] (base + bias + delta) -> rows of DoRA tokens become bias + f * (y - bias), in place.

    scales [S, out] float32 (1 where a slot or sub-module is not DoRA); bias [out] or None."""
    if dora.rows.numel() == 0:
        return
    dora_scale_rows_ref(y, dora.rows, dora.slots, scales, bias)


def dora_scale_rows_ref(y: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor, scales: torch.Tensor,
                        bias: torch.Tensor | None) -> None:
    """Pure-torch twin of the native dora_scale_rows (kernels/csrc/dora.cpp), same signature.

    y [T, out]; rows [Td] int64 (distinct rows of y), slots [Td] int64 (their adapter slots);
    scales [S, out] float32; bias [out] or None. y[rows] <- bias + scales[slots] * (y[rows] - bias)
    in place (y[rows] * scales[slots] without a bias): a subtract, multiply and add in float32
    (in float64 when y is float64, as the error-bound tests run it)."""
    work = torch.promote_types(y.dtype, torch.float32)
    factor = scales.index_select(0, slots).to(work)                              # [Td, out]
    sub = y.index_select(0, rows).to(work)                                       # [Td, out]
    if bias is None:
        sub = sub * factor
    else:
        bias = bias.to(work)
        sub = (sub - bias) * factor + bias
    y.index_copy_(0, rows, sub.to(y.dtype))

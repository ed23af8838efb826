"""Tolerances derived from the error bound of a floating-point computation, not a fixed atol.

A fast kernel and its twin sum in different orders (and the kernels are built with
-march=native, so the order differs per CPU: AVX2 vs AVX-512). Neither is "the" answer: each
is checked against the exact result (computed in float64) within the classic bound for a sum
of n rounded products,

    |computed - exact| <= gamma_n * sum_i |a_i * b_i|,      gamma_n = n u / (1 - n u),

with u the unit roundoff of the accumulation dtype (Higham, Accuracy and Stability of
Numerical Algorithms, 3.1). `magnitude` is that sum of absolute products per output element
(the same computation run on absolute values, in float64); `terms` the longest chain of
rounded operations feeding one element (reduction length plus any adds and scalings).
"""

from __future__ import annotations

import torch

UNIT_ROUNDOFF = {torch.float32: 2.0 ** -24, torch.float64: 2.0 ** -53, torch.bfloat16: 2.0 ** -8,
                 torch.float16: 2.0 ** -11}


def gamma(terms: int, dtype: torch.dtype = torch.float32) -> float:
    """gamma_n for n rounded operations in `dtype`."""
    nu = terms * UNIT_ROUNDOFF[dtype]
    assert nu < 1, f"{terms} terms in {dtype}: the bound is void"
    return nu / (1 - nu)


def assert_within_bound(got: torch.Tensor, exact: torch.Tensor, magnitude: torch.Tensor, terms: int,
                        dtype: torch.dtype = torch.float32, what: str = "") -> None:
    """Elementwise |got - exact| <= gamma_terms * magnitude (+ the rounding of the result itself).

    exact, magnitude: float64, same shape as got. Reports the worst element's error/bound ratio."""
    got64, exact = got.double(), exact.double()
    bound = gamma(terms, dtype) * magnitude.double() + UNIT_ROUNDOFF[got.dtype] * exact.abs()
    bound = bound + torch.finfo(got.dtype).tiny                  # an exact zero stays within bound
    error = (got64 - exact).abs()
    ratio = error / bound
    worst = int(ratio.argmax())
    assert bool((error <= bound).all()), (
        f"{what}: {int((error > bound).sum())} of {error.numel()} elements outside the error bound; worst "
        f"index {worst}: |{got64.flatten()[worst]:.9g} - {exact.flatten()[worst]:.9g}| = "
        f"{error.flatten()[worst]:.3g} > bound {bound.flatten()[worst]:.3g} (gamma_{terms}, {dtype})")

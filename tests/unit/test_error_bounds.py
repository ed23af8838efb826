"""The twin tests' tolerance rule (tests/error_bounds.py): float32 sums in another order (as
AVX2 vs AVX-512 builds of one kernel do) stay within the derived bound where a fixed
atol = rtol = 1e-5 does not, and a real mistake (one product dropped) is still caught."""

from __future__ import annotations

import pytest
import torch

from error_bounds import assert_within_bound, gamma


def _dot_in_lanes(x: torch.Tensor, w: torch.Tensor, lanes: int) -> torch.Tensor:
    """x [T, n] @ w[n] in float32 as a SIMD kernel sums: `lanes` partial sums, then across lanes."""
    partial = torch.zeros(x.shape[0], lanes)
    n = x.shape[1]
    for start in range(0, n, lanes):
        block = x[:, start:start + lanes] * w[start:start + lanes]
        partial[:, : block.shape[1]] += block
    total = torch.zeros(x.shape[0])
    for lane in range(lanes):
        total += partial[:, lane]
    return total


def _case():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(256, 8192, generator=gen)           # O(1) values, a long reduction
    w = torch.randn(8192, generator=gen)
    exact = x.double() @ w.double()
    magnitude = x.double().abs() @ w.double().abs()
    return x, w, exact, magnitude


def test_other_summation_orders_pass_the_bound_but_not_a_fixed_atol():
    x, w, exact, magnitude = _case()
    avx2, avx512 = _dot_in_lanes(x, w, 8), _dot_in_lanes(x, w, 16)
    for got in (avx2, avx512):
        assert_within_bound(got, exact, magnitude, terms=x.shape[1])
    with pytest.raises(AssertionError):              # the old fixed tolerance fails on this data
        torch.testing.assert_close(avx2, avx512, atol=1e-5, rtol=1e-5)


def test_a_dropped_product_is_outside_the_bound():
    x, w, _, _ = _case()
    x, w = x[:, :53], w[:53]                          # the LoRA twin test's reduction length
    exact, magnitude = x.double() @ w.double(), x.double().abs() @ w.double().abs()
    wrong = _dot_in_lanes(x[:, 1:], w[1:], 16)        # forgot the first product
    with pytest.raises(AssertionError, match="outside the error bound"):
        assert_within_bound(wrong, exact, magnitude, terms=x.shape[1])


def test_gamma_grows_with_terms_and_refuses_void_bounds():
    assert gamma(10) < gamma(100) < 1e-4
    with pytest.raises(AssertionError):
        gamma(2**25)

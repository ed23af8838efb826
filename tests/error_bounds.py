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


def attention_bound(q: torch.Tensor, k_cache: torch.Tensor, scale: float, num_keys: int,
                    value_magnitude: torch.Tensor, stored: torch.dtype = torch.float32) -> torch.Tensor:
    """Per element bound on |computed - exact| of softmax(scale q.k) @ v, float32 sums.

    q [T, heads, hd]; value_magnitude [T, heads, hd] = sum_j p_j |v_j| / sum_j p_j (the exact
    attention run on |v|, float64). Each score has error <= delta = gamma_hd * scale * |q|.|k_j|
    <= gamma_hd * scale * ||q|| * max ||k|| (Cauchy-Schwarz), so each weight exp(s_j - max) is off
    by a relative 2 delta + the exp's and subtraction's rounding; numerator and denominator
    sums add gamma_L each. Result: (2 rho + 2 gamma_L) * value_magnitude, rho = 2 delta + 8u.
    `stored`: the dtype scores and weights are stored in between those float32 sums (bfloat16
    paths): each is rounded once more, a relative u_stored (scores: of scale ||q|| max ||k||)."""
    u = UNIT_ROUNDOFF[torch.float32]
    u_stored = 0.0 if stored == torch.float32 else UNIT_ROUNDOFF[stored]         # float32: no extra rounding
    q_norm = q.double().norm(dim=-1, keepdim=True)                               # [T, heads, 1]
    k_norm = k_cache.double().norm(dim=-1).max()
    delta = (gamma(q.shape[-1]) + u_stored) * scale * q_norm * k_norm
    rho = 2 * delta + 8 * u + 2 * u_stored
    return (2 * rho + 2 * gamma(num_keys + 2)) * value_magnitude.double()


def assert_within(got: torch.Tensor, exact: torch.Tensor, bound: torch.Tensor, what: str = "") -> None:
    """Elementwise |got - exact| <= bound (a bound computed by the caller)."""
    assert got.shape == exact.shape, f"{what}: shape {tuple(got.shape)}, expected {tuple(exact.shape)}"
    if got.numel() == 0:
        return
    error = (got.double() - exact.double()).abs()
    bound = bound + UNIT_ROUNDOFF[got.dtype] * exact.double().abs() + torch.finfo(got.dtype).tiny
    worst = int((error / bound).argmax())
    assert bool((error <= bound).all()), (
        f"{what}: {int((error > bound).sum())} of {error.numel()} elements outside the error bound; worst "
        f"index {worst}: error {error.flatten()[worst]:.3g} > bound {bound.flatten()[worst]:.3g}")


def dot_bound(magnitude: torch.Tensor, terms: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """gamma_terms x magnitude: the bound of sums of `terms` rounded products whose sum of
    |products| per element is `magnitude` (float64), for assert_within."""
    return gamma(terms, dtype) * magnitude.double()


def exact_rms_norm(h: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """h [T, n] * weight / sqrt(mean(h^2) + eps), all in float64 (the served rms_norm computes
    its statistics in float32 for every dtype but float32, so its float64 run is not exact)."""
    h, weight = h.double(), weight.double()
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * weight


def rms_norm_bound(exact: torch.Tensor, width: int) -> torch.Tensor:
    """Bound of a float32 rms norm of `width` columns: a sum of squares (every term >= 0, so its
    sum of |terms| is the sum itself: relative error gamma_width), then a few relative roundings
    (mean, eps, rsqrt, two products, a residual add): gamma_(width + 8) of each output."""
    return gamma(width + 8) * exact.double().abs()


def rope_magnitude_sin(sin: torch.Tensor) -> torch.Tensor:
    """sin [T, hd] -> the sin that makes the rotation x cos + rotate_half(x) sin, run on |x| and
    |cos|, give |x| |cos| + |rotate_half(x)| |sin| (its sum of |products|): rotate_half negates
    the second half of x into the first, so the first half's sin is negated too."""
    half = sin.shape[-1] // 2
    return torch.cat([-sin[..., :half].abs(), sin[..., half:].abs()], -1)


def silu_mul_bound(gate_up: torch.Tensor, exp_ulps: int = 8) -> torch.Tensor:
    """Bound of silu(gate) * up, gate_up [T, 2 I] (gate first) -> [T, I], elementwise, no sum.

    exp may be a vectorized approximation: an error of k ulp in exp(-g) moves silu(g) * up by
    |g up| s (1 - s) k u (s = sigmoid(g)), with k <= exp_ulps, plus the products' roundings.
    Where exp(-g) leaves float32's range (g < -87) a kernel may saturate it at ~2^127: the
    result is then off by at most |g up| 2^-125."""
    gate, up = gate_up.double().chunk(2, dim=-1)
    sig = torch.sigmoid(gate)
    exact = gate * sig * up
    return (gamma(exp_ulps) * (exact.abs() + (gate * up).abs() * sig * (1 - sig))
            + (gate * up).abs() * 2.0 ** -125)

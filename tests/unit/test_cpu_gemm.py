"""The prepacked oneDNN linear against its F.linear reference twin, and kernel selection."""

from __future__ import annotations

import pytest
import torch

from error_bounds import assert_within, dot_bound
from loraplex.server.layers.base import QuantSpec
from loraplex.server.layers.cpu_gemm import (
    onednn_supported, pack_weight, packed_linear, packed_linear_ref, row_bucket, unpack_weight,
    use_onednn)
from loraplex.server.layers.dense import DenseLinear

needs_onednn = pytest.mark.skipif(not onednn_supported(torch.float32, "cpu"),
                                  reason="this torch build has no oneDNN linear ops")


def assert_linear_within_bound(got: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                               bias: torch.Tensor | None, what: str) -> None:
    """got within the bound of x @ weight^T + bias summed in float32 in any order: gamma_(in + 1)
    x (|x| @ |weight|^T + |bias|) of the exact float64 result (bfloat16 inputs multiply exactly
    in float32, and oneDNN's and ATen's CPU GEMMs accumulate bfloat16 in float32), plus the
    output's own rounding to its dtype (assert_within adds it)."""
    x64, w64 = x.double(), weight.double()
    b64 = torch.zeros(weight.shape[0], dtype=torch.float64) if bias is None else bias.double()
    exact = x64 @ w64.T + b64
    magnitude = x64.abs() @ w64.abs().T + b64.abs()
    assert_within(got, exact, dot_bound(magnitude, x.shape[1] + 1), what=what)


@needs_onednn
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_tokens", [0, 1, 7, 16, 65, 300])
@pytest.mark.parametrize("with_bias", [False, True])
def test_packed_linear_matches_reference(dtype, num_tokens, with_bias):
    if not onednn_supported(dtype, "cpu"):
        pytest.skip(f"this CPU has no oneDNN {dtype} GEMMs (bf16 needs AVX-512)")
    if dtype == torch.bfloat16 and not onednn_supported(dtype, "cpu"):
        pytest.skip("no bfloat16 oneDNN path")
    gen = torch.Generator().manual_seed(num_tokens)
    weight = torch.randn(96, 160, generator=gen).to(dtype)              # [out, in]
    bias = torch.randn(96, generator=gen).to(dtype) if with_bias else None
    x = torch.randn(num_tokens, 160, generator=gen).to(dtype)           # [T, in]
    got = packed_linear(x, pack_weight(weight), bias)
    want = packed_linear_ref(x, weight, bias)
    assert got.shape == want.shape == (num_tokens, 96) and got.dtype == dtype
    assert_linear_within_bound(got, x, weight, bias, "packed_linear")
    assert_linear_within_bound(want, x, weight, bias, "packed_linear_ref")


@needs_onednn
def test_packed_linear_takes_strided_input():
    """Projections feed views (e.g. the attention output reshaped, a gate slice)."""
    weight = torch.randn(64, 48)
    wide = torch.randn(10, 96)
    x = wide[:, ::2]                                                    # [10, 48], not contiguous
    assert_linear_within_bound(packed_linear(x, pack_weight(weight), None), x, weight, None, "packed_linear")
    assert_linear_within_bound(packed_linear_ref(x, weight, None), x, weight, None, "packed_linear_ref")


@needs_onednn
def test_pack_round_trip_is_exact():
    weight = torch.randn(33, 70)
    assert torch.equal(unpack_weight(pack_weight(weight)), weight)


@needs_onednn
def test_dense_linear_kernels_agree_and_report_the_same_bytes():
    weight, bias = torch.randn(40, 24), torch.randn(40)
    fast = DenseLinear(weight, bias, QuantSpec(linear_kernel="onednn"))
    plain = DenseLinear(weight, bias, QuantSpec(linear_kernel="aten"))
    assert fast.packed and not plain.packed
    x = torch.randn(5, 24)
    assert_linear_within_bound(fast.linear(x), x, weight, bias, "onednn DenseLinear")
    assert_linear_within_bound(plain.linear(x), x, weight, bias, "aten DenseLinear")
    assert fast.weight_bytes() == plain.weight_bytes() == (40 * 24 + 40) * 4
    assert torch.equal(fast.dequantized_weight(), weight)


def test_kernel_choice():
    assert use_onednn("aten", torch.float32, "cpu") is False
    assert use_onednn("auto", torch.float16, "cpu") is False            # no packed fp16 path
    assert use_onednn("auto", torch.float32, "cuda") is False
    with pytest.raises(ValueError, match="--linear-kernel onednn needs a CPU device"):
        use_onednn("onednn", torch.float16, "cpu")
    with pytest.raises(ValueError, match="choose one of auto, onednn, aten"):
        use_onednn("mkl", torch.float32, "cpu")
    with pytest.raises(ValueError, match="linear_kernel must be one of auto, onednn, aten"):
        QuantSpec(linear_kernel="fast")


def test_row_buckets_bound_the_distinct_shapes():
    buckets = {row_bucket(n) for n in range(1, 2049)}
    assert len(buckets) == 8 + 7 + 31
    for n in range(1, 2049):
        assert 0 <= row_bucket(n) - n < (8 if n <= 64 else 64)
    assert [row_bucket(n) for n in (1, 8, 9, 16, 64, 65, 300)] == [1, 8, 16, 16, 64, 128, 320]


@needs_onednn
def test_process_memory_stays_bounded_over_many_batch_sizes():
    """Every row count of a serving loop must not leave its own cached oneDNN primitive."""
    def rss_mib() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096 >> 20
    weight = pack_weight(torch.randn(8192, 64))
    for rows in (1, 2, 3, 4, 5, 6, 7, 8, 16, 24, 32, 40, 48, 56, 64, 128, 192, 256, 320, 384, 448):
        packed_linear(torch.randn(rows, 64), weight, None)             # one call per bucket
    start = rss_mib()
    for rows in list(range(1, 449)) * 2:                                # every other row count
        packed_linear(torch.randn(rows, 64), weight, None)
    assert rss_mib() - start < 64       # heap high-water of the outputs; 3 GiB without buckets

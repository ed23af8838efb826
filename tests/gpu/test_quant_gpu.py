"""The quantized backends on CUDA: library parity, fast HQQ kernels, EETQ kernel vs torch path."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from loraplex.server.layers.base import QuantSpec
from loraplex.server.layers.factory import build_linear

pytestmark = pytest.mark.gpu


def _weights(out_features: int = 256, in_features: int = 512, dtype=torch.float16):
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(out_features, in_features, generator=gen) * 0.05     # [out, in]
    x = torch.randn(8, in_features, generator=gen).to("cuda", dtype)         # [T, in]
    return weight, x


@pytest.mark.parametrize("method", ["bnb-nf4", "bnb-fp4"])
def test_bnb_4bit_matches_linear4bit_on_cuda(method):
    from bitsandbytes.nn import Linear4bit

    weight, x = _weights()
    spec = QuantSpec(method=method, compute_dtype=torch.float16, device="cuda")
    library = Linear4bit(512, 256, bias=False, compute_dtype=torch.float16,
                         quant_type=method[4:], compress_statistics=False)
    library.load_state_dict({"weight": weight.half()})
    library = library.to("cuda")
    ours = build_linear(weight, None, spec)
    assert torch.equal(ours.w_4bit, library.weight.data)
    with torch.no_grad():
        torch.testing.assert_close(ours.linear(x), library(x), rtol=0, atol=0)
        torch.testing.assert_close(ours.linear(x[:1]), library(x[:1]), rtol=0, atol=0)  # gemv


def test_bnb_int8_matches_linear8bitlt_on_cuda():
    from bitsandbytes.nn import Linear8bitLt

    weight, x = _weights()
    x[:, 3] *= 30.0
    library = Linear8bitLt(512, 256, bias=False, has_fp16_weights=False, threshold=6.0)
    library.load_state_dict({"weight": weight}, strict=False)
    library = library.to("cuda")
    ours = build_linear(weight, None, QuantSpec(method="bnb-int8", compute_dtype=torch.float16,
                                                device="cuda"))
    with torch.no_grad():
        torch.testing.assert_close(ours.linear(x), library(x), rtol=0, atol=0)


@pytest.mark.parametrize("method", ["hqq-2bit", "hqq-3bit", "hqq-4bit", "hqq-8bit"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_hqq_kernel_matches_dequantized_weight_on_cuda(method, dtype):
    weight, x = _weights(dtype=dtype)
    layer = build_linear(weight, None, QuantSpec(method=method, compute_dtype=dtype,
                                                 device="cuda"))
    expected = F.linear(x.float(), layer.dequantized_weight().float()).to(dtype)
    # fast kernels accumulate in other orders and may round activations; allow 16-bit rounding
    torch.testing.assert_close(layer.linear(x), expected, rtol=2e-2, atol=2e-2)


@pytest.mark.skipif(importlib.util.find_spec("EETQ") is None, reason="eetq is not installed")
def test_eetq_kernel_matches_torch_path():
    weight, x = _weights()
    kernel = build_linear(weight, None, QuantSpec(method="eetq", compute_dtype=torch.float16,
                                                  device="cuda"))
    assert kernel.uses_eetq_kernel
    torch_path = build_linear(weight.half().float(), None,
                              QuantSpec(method="eetq", compute_dtype=torch.float32, device="cuda"))
    assert not torch_path.uses_eetq_kernel
    # Same scheme: int8 codes agree except on round-half ties; scales in float16 vs float32.
    torch.testing.assert_close(kernel.dequantized_weight().float(),
                               torch_path.dequantized_weight(), rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(kernel.linear(x).float(), torch_path.linear(x.float()),
                               rtol=2e-2, atol=2e-2)


def test_eetq_torch_path_on_cuda_matches_cpu():
    weight, x = _weights(dtype=torch.float32)
    cuda_layer = build_linear(weight, None, QuantSpec(method="eetq", device="cuda"))
    cpu_layer = build_linear(weight, None, QuantSpec(method="eetq"))
    assert not cuda_layer.uses_eetq_kernel   # the kernel path needs float16
    assert torch.equal(cuda_layer.w_int8.cpu(), cpu_layer.w_int8)
    torch.testing.assert_close(cuda_layer.linear(x).cpu(), cpu_layer.linear(x.cpu()),
                               rtol=1e-4, atol=1e-4)

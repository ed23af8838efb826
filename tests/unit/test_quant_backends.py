"""Quantized linear backends: same numbers as the libraries, bounded error, exact fusion."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from loraplex.server.layers.base import QuantSpec
from loraplex.server.layers.eetq_ref import int8_weight_only_linear_ref
from loraplex.server.layers.factory import build_fused_linear, build_linear, fuses_exactly

CPU_METHODS = ("bnb-nf4", "bnb-fp4", "bnb-int8", "hqq-2bit", "hqq-3bit", "hqq-4bit",
               "hqq-8bit", "eetq")
OUT_FEATURES, IN_FEATURES, NUM_TOKENS = 96, 192, 5


def _weights(seed: int = 0, out_features: int = OUT_FEATURES, in_features: int = IN_FEATURES):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=gen) * 0.05   # [out, in]
    bias = torch.randn(out_features, generator=gen) * 0.1                    # [out]
    x = torch.randn(NUM_TOKENS, in_features, generator=gen)                  # [T, in]
    return weight, bias, x


def _library_module(method: str, weight: torch.Tensor, bias: torch.Tensor, spec: QuantSpec):
    """The library's own layer quantized from the same float weight."""
    out_features, in_features = weight.shape
    if method in ("bnb-nf4", "bnb-fp4"):
        from bitsandbytes.nn import Linear4bit

        module = Linear4bit(in_features, out_features, compute_dtype=spec.compute_dtype,
                            quant_type=method[4:], compress_statistics=spec.bnb_double_quant)
        module.support_avx512bf16_for_cpu = False   # keep float32 compute (see quant_oracle)
    elif method == "bnb-int8":
        from bitsandbytes.nn import Linear8bitLt

        module = Linear8bitLt(in_features, out_features, has_fp16_weights=False,
                              threshold=spec.bnb_int8_threshold)
    else:
        from hqq.core.quantize import HQQLinear

        from loraplex.server.layers.hqq import hqq_nbits, hqq_quant_config

        linear = torch.nn.Linear(in_features, out_features)
        linear.load_state_dict({"weight": weight, "bias": bias})
        return HQQLinear(linear, hqq_quant_config(hqq_nbits(method), spec.hqq_group_size),
                         compute_dtype=spec.compute_dtype, device="cpu")
    module.load_state_dict({"weight": weight, "bias": bias}, strict=False)
    return module.to("cpu").eval()   # bitsandbytes quantizes on .to(device)


LIBRARY_CASES = [(m, False) for m in CPU_METHODS if m != "eetq"] + [
    ("bnb-nf4", True), ("bnb-fp4", True)]


@pytest.mark.parametrize("method,double_quant", LIBRARY_CASES)
def test_output_equals_library_module(method, double_quant):
    weight, bias, x = _weights()
    x[:, 3] *= 30.0   # an outlier column: exercises LLM.int8's float path (threshold 6)
    spec = QuantSpec(method=method, bnb_double_quant=double_quant)
    ours = build_linear(weight, bias, spec)
    with torch.no_grad():
        expected = _library_module(method, weight, bias, spec)(x)
    torch.testing.assert_close(ours.linear(x), expected, rtol=0, atol=0)


def test_eetq_torch_path_matches_reference_twin():
    weight, bias, x = _weights()
    layer = build_linear(weight, bias, QuantSpec(method="eetq"))
    assert not layer.uses_eetq_kernel
    assert layer.w_int8.dtype == torch.int8
    assert torch.equal(layer.w_int8.abs().amax(dim=1), torch.full((OUT_FEATURES,), 127,
                                                                  dtype=torch.int8))
    expected = int8_weight_only_linear_ref(x, layer.w_int8, layer.scale, layer.bias)
    # Only the order of rounding differs: (x @ q^T) * s vs x @ (q * s)^T.
    torch.testing.assert_close(layer.linear(x), expected, rtol=1e-5, atol=1e-5)


def _elementwise_weight_bound(method: str, weight: torch.Tensor, layer) -> torch.Tensor:
    """[out, in] worst-case |W_dequant - W| for the scheme (float rounding not included)."""
    if method in ("bnb-nf4", "bnb-fp4"):
        from bitsandbytes.functional import get_4bit_type

        code = get_4bit_type(method[4:], device="cpu").sort().values
        half_gap = float((code[1:] - code[:-1]).max()) / 2          # nearest-code rounding
        block_absmax = weight.reshape(-1, 64).abs().amax(dim=1, keepdim=True)
        return (half_gap * block_absmax).expand(-1, 64).reshape(weight.shape)
    if method in ("bnb-int8", "eetq"):
        # Half a step of absmax/127 per row; bnb first casts the weight to float16.
        row_step = weight.abs().amax(dim=1, keepdim=True) / 127
        fp16_cast = weight.abs() * 2**-11 if method == "bnb-int8" else 0.0
        return row_step / 2 + fp16_cast + 0 * weight
    # HQQ: the optimizer moves the zero point, so values near a group's edge may clamp; the
    # error stays within one step (scale) of the group.
    meta = layer.hqq.meta
    group_size = meta["group_size"]
    return meta["scale"].abs().expand(-1, group_size).reshape(weight.shape)


@pytest.mark.parametrize("method", CPU_METHODS)
def test_error_vs_float_linear_is_within_scheme_bound(method):
    weight, bias, x = _weights(seed=1)
    layer = build_linear(weight, bias, QuantSpec(method=method))
    weight_err = (layer.dequantized_weight() - weight).abs()
    bound = _elementwise_weight_bound(method, weight, layer)
    assert bool((weight_err <= bound * (1 + 1e-5) + 1e-7).all()), float((weight_err - bound).max())
    # Output: |x @ (W_q - W)^T| <= |x| @ bound^T, plus LLM.int8's activation rounding
    # (half a step of the token's absmax / 127, and the float16 cast).
    output_bound = x.abs() @ bound.t()
    if method == "bnb-int8":
        x_step = x.abs().amax(dim=1, keepdim=True) / 127
        output_bound += (x_step / 2 + x.abs() * 2**-11) @ layer.dequantized_weight().abs().t()
    output_bound += 1e-5 * (x.abs() @ weight.abs().t()) + 1e-5
    error = (layer.linear(x) - F.linear(x, weight, bias)).abs()
    assert bool((error <= output_bound).all())


@pytest.mark.parametrize("method", [m for m in CPU_METHODS if m != "bnb-int8"])
def test_apply_equals_dequantized_linear(method):
    """(LLM.int8 also quantizes activations: covered by the bound test instead.)"""
    weight, bias, x = _weights(seed=2)
    layer = build_linear(weight, bias, QuantSpec(method=method))
    dequantized = layer.dequantized_weight()
    assert dequantized.shape == weight.shape and dequantized.dtype == torch.float32
    torch.testing.assert_close(layer.linear(x), F.linear(x, dequantized, bias),
                               rtol=1e-5, atol=1e-5)


def _parts(in_features: int):
    return [_weights(seed=s, out_features=n, in_features=in_features)[0]
            for s, n in ((3, 128), (4, 64), (5, 64))]        # q, k, v: [out_i, in]


@pytest.mark.parametrize("method", CPU_METHODS)
@pytest.mark.parametrize("double_quant", [False, True])
def test_fused_layer_equals_separate_layers(method, double_quant):
    spec = QuantSpec(method=method, bnb_double_quant=double_quant)
    parts = _parts(IN_FEATURES)
    x = _weights(seed=6)[2]
    fused = build_fused_linear(parts, [None] * 3, spec)
    separate = torch.cat([build_linear(w, None, spec).linear(x) for w in parts], dim=-1)
    assert fused.out_features == 256
    torch.testing.assert_close(fused.linear(x), separate, rtol=0, atol=0)
    assert fused.weight_bytes() <= sum(build_linear(w, None, spec).weight_bytes() for w in parts)


@pytest.mark.parametrize("method", ["bnb-nf4", "bnb-fp4", "bnb-int8", "eetq"])
def test_quantizing_concatenated_weight_is_exact_when_blocks_stay_in_rows(method):
    """What `fuses_exactly` claims: block/row-local schemes store the same data fused."""
    spec = QuantSpec(method=method)
    assert fuses_exactly(spec, IN_FEATURES)                    # 192 % 64 == 0
    parts = _parts(IN_FEATURES)
    fused = build_linear(torch.cat(parts), None, spec)
    separate = [build_linear(w, None, spec) for w in parts]
    torch.testing.assert_close(fused.dequantized_weight(),
                               torch.cat([s.dequantized_weight() for s in separate]),
                               rtol=0, atol=0)


def test_fusion_conditions():
    assert not fuses_exactly(QuantSpec(method="bnb-nf4"), 96)          # blocks straddle rows
    assert not fuses_exactly(QuantSpec(method="bnb-nf4", bnb_double_quant=True), 192)
    assert not fuses_exactly(QuantSpec(method="hqq-4bit"), 192)        # tensor-wide early stop
    assert fuses_exactly(QuantSpec(method="bnb-int8"), 97)


@pytest.mark.parametrize("method,expected_bytes", [
    # data + per-block/row statistics + code tables + bias (float32, 96 values)
    ("bnb-nf4", 96 * 192 // 2 + 96 * 192 // 64 * 4 + 16 * 4 + 96 * 4),
    ("bnb-int8", 96 * 192 + 96 * 4 + 96 * 4),
    ("eetq", 96 * 192 + 96 * 4 + 96 * 4),
    ("hqq-4bit", 96 * 192 // 2 + 2 * (96 * 192 // 64) * 4 + 96 * 4),
    ("hqq-8bit", 96 * 192 + 2 * (96 * 192 // 64) * 4 + 96 * 4),
])
def test_weight_bytes(method, expected_bytes):
    weight, bias, _ = _weights()
    assert build_linear(weight, bias, QuantSpec(method=method)).weight_bytes() == expected_bytes


def test_nf4_double_quant_stores_absmax_in_one_byte():
    weight, _, _ = _weights()
    single = build_linear(weight, None, QuantSpec(method="bnb-nf4")).weight_bytes()
    double = build_linear(weight, None, QuantSpec(method="bnb-nf4", bnb_double_quant=True))
    num_blocks = 96 * 192 // 64
    # absmax: 4 bytes -> 1 byte per block, plus one float32 absmax per 256 blocks (rounded up), the
    # 256-entry dynamic code and the offset.
    assert double.weight_bytes() == single - 3 * num_blocks + 4 * -(-num_blocks // 256) + 256 * 4 + 4


def test_hqq_rejects_group_size_that_does_not_divide_in_features():
    weight, _, _ = _weights(in_features=96)
    with pytest.raises(ValueError, match="group_size 64 must divide in_features 96"):
        build_linear(weight, None, QuantSpec(method="hqq-4bit"))


@pytest.mark.parametrize("method", ["bnb-nf4", "hqq-4bit"])
def test_bfloat16_compute_matches_library_fed_bfloat16_weights(method):
    """Like transformers with dtype=bfloat16: the weight is cast, then quantized."""
    weight, bias, x = _weights(seed=7)
    spec = QuantSpec(method=method, compute_dtype=torch.bfloat16)
    ours = build_linear(weight, bias, spec)
    x16 = x.to(torch.bfloat16)
    with torch.no_grad():
        expected = _library_module(method, weight.to(torch.bfloat16), bias.to(torch.bfloat16),
                                   spec)(x16)
    assert ours.linear(x16).dtype == torch.bfloat16
    torch.testing.assert_close(ours.linear(x16), expected, rtol=0, atol=0)


@pytest.mark.parametrize("method", CPU_METHODS)
def test_output_dtype_follows_compute_dtype(method):
    weight, bias, x = _weights(seed=8)
    layer = build_linear(weight, bias, QuantSpec(method=method, compute_dtype=torch.bfloat16))
    assert layer.linear(x.to(torch.bfloat16)).dtype == torch.bfloat16
    assert layer.dequantized_weight().dtype == torch.bfloat16


NATIVE_ROUTES = ((4, "native"), (32, "native"), (64, "library"))


@pytest.mark.parametrize("method,double_quant,joins", [
    ("hqq-4bit", False, True), ("hqq-3bit", False, True), ("hqq-2bit", False, True),
    ("hqq-8bit", False, False),            # 8-bit codes are HQQ's own tensor: not copied
    ("bnb-nf4", True, False)])             # bnb codes are read where they lie
def test_concat_parts_join_into_one_fused_gemm(native_kernels, method, double_quant, joins):
    """A ConcatLinear whose parts own their fused-kernel packs stacks them into one (the parts'
    packs become views into it): rows every part serves natively run one GEMM, bit-equal to
    the parts one by one; resident bytes count the joined copies once."""
    spec = QuantSpec(method=method, bnb_double_quant=double_quant)
    fused = build_fused_linear(_parts(IN_FEATURES), [None] * 3, spec)
    for part in fused.parts:
        assert part.attach_native(native_kernels)
        part.set_kernel_routes(NATIVE_ROUTES)
    xs = {rows: torch.randn(rows, IN_FEATURES, generator=torch.Generator().manual_seed(rows))
          for rows in (1, 2, 3, 16, 40, 70)}
    before, bytes_before = {rows: fused.linear(x) for rows, x in xs.items()}, fused.weight_bytes()
    assert fused.join_native() is joins
    for rows, x in xs.items():
        torch.testing.assert_close(fused.linear(x), before[rows], rtol=0, atol=0)
    if not joins:
        assert fused.joined is None and fused.weight_bytes() == bytes_before
        return
    _, pack, _ = fused.joined
    assert pack.codes.shape[0] == fused.out_features
    start = pack.codes.data_ptr()
    offsets = [part.native_kernel[1].codes.data_ptr() - start for part in fused.parts]
    assert offsets == [0, 128 * pack.codes.shape[1], 192 * pack.codes.shape[1]]   # views, no copy
    assert fused.joined_native(16) is not None and fused.joined_native(40) is None  # 33+: library
    scales_zeros = 2 * pack.scales.numel() * pack.scales.element_size()
    assert fused.weight_bytes() == bytes_before + scales_zeros      # HQQ keeps its own meta too


def test_concat_of_one_part_does_not_join(native_kernels):
    single = build_fused_linear(_parts(IN_FEATURES)[:1], [None], QuantSpec(method="hqq-4bit"))
    single.parts[0].attach_native(native_kernels)
    single.parts[0].set_kernel_routes(NATIVE_ROUTES)
    assert not single.join_native()                       # nothing to save, scales not copied


def test_concat_does_not_join_parts_on_different_routes(native_kernels):
    fused = build_fused_linear(_parts(IN_FEATURES), [None] * 3, QuantSpec(method="hqq-4bit"))
    for part in fused.parts:
        part.attach_native(native_kernels)
    fused.parts[0].set_kernel_routes(NATIVE_ROUTES)
    for part in fused.parts[1:]:
        part.set_kernel_routes(((4, "native"), (32, "library"), (64, "library")))
    assert fused.join_native()
    assert fused.joined_native(1) is not None and fused.joined_native(16) is None
    x = torch.randn(16, IN_FEATURES)
    torch.testing.assert_close(fused.linear(x), torch.cat([p.linear(x) for p in fused.parts], -1),
                               rtol=0, atol=0)

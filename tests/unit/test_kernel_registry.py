"""Every registered kernel against its pure-torch twin, driven by the registry's table.

A new row in kernels/registry.py KERNEL_OPS needs a case here (test_every_op_has_a_case); each
case yields (args, atol): the fast implementation and the twin run on copies of the same args,
and every output and every tensor argument (for in-place ops) must agree.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from error_bounds import assert_within_bound
from loraplex.server.kernels import quant
from loraplex.server.kernels.registry import (KERNEL_OPS, KernelSet, implementation, kernel_op,
                                              reference)
from loraplex.server.layers.base import QuantSpec
from loraplex.server.layers.cpu_gemm import onednn_supported, pack_weight
from loraplex.server.layers.factory import build_linear

ATOL = 2e-5      # ops not yet given a derived bound (attention, norms, rope, silu, quant GEMMs, decode_stack)


@dataclass(frozen=True)
class SumBound:
    """The op is a sum of products of its float inputs (linear in each): the fast kernel and its
    twin are each checked against the twin run in float64, within gamma_terms x the twin run on
    the inputs' absolute values (tests/error_bounds.py), instead of a fixed atol that assumes
    one order of float32 summation (issue 31: AVX2 and AVX-512 builds sum in different orders)."""

    terms: int
    weights_are_ints: bool = False     # integer tensors are weights (abs them), not ids


@dataclass(frozen=True)
class DoraBound:
    """dora_scale_rows rounds three float32 operations per element, bias + f * (y - bias), and
    sums nothing: fast and twin are each checked against the twin run in float64 within
    gamma_3 x (|bias| + |f| (|y| + |bias|)) on the scaled rows (tests/error_bounds.py); rows not
    scaled must come back unchanged."""


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def case_decode_attention():
    gen = _gen(0)
    for heads, kv_heads, head_dim, window in [(9, 3, 64, 0), (4, 4, 128, 5), (6, 2, 48, 0)]:
        k_cache = torch.randn(40, 4, kv_heads, head_dim, generator=gen)
        v_cache = torch.randn(40, 4, kv_heads, head_dim, generator=gen)
        tables = torch.randperm(40, generator=gen)[:35].view(5, 7)
        q = torch.randn(5, heads, head_dim, generator=gen)
        yield (q, k_cache, v_cache, tables, torch.tensor([1, 4, 9, 17, 28]), 0.3, window), ATOL


def case_varlen_attention():
    gen = _gen(9)
    k_cache = torch.randn(40, 4, 2, 32, generator=gen)                   # [blocks, block, kv_heads, hd]
    v_cache = torch.randn(40, 4, 2, 32, generator=gen)
    tables = torch.randperm(40, generator=gen)[:36].view(4, 9)           # [seqs, max_blocks]
    query_lens, seq_lens = [1, 7, 21, 3], [9, 7, 33, 12]                 # decode, prefill, long, chunk
    starts = torch.tensor([0, 1, 8, 29, 32])
    q = torch.randn(sum(query_lens), 6, 32, generator=gen)              # [T, heads, hd]
    for window in (0, 6):
        yield (q, k_cache, v_cache, tables, starts, torch.tensor(seq_lens), max(query_lens), 0.2,
               window), ATOL


def case_add_rms_norm():
    gen = _gen(1)
    for rows in (1, 16, 300):
        x, weight = torch.randn(rows, 576, generator=gen) * 3, torch.randn(576, generator=gen)
        yield (x, None, weight, 1e-5), ATOL
        yield (x, torch.randn(rows, 576, generator=gen), weight, 1e-5), ATOL


def case_rope_write_kv():
    gen = _gen(2)
    heads, kv_heads, head_dim = 9, 3, 64
    for tokens in (1, 5, 40):
        width = (heads + 2 * kv_heads) * head_dim
        qkv = torch.randn(tokens, width, generator=gen)
        angles = torch.rand(tokens, head_dim // 2, generator=gen) * 6
        cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
        caches = [torch.zeros(8, 16, kv_heads, head_dim) for _ in range(2)]
        slots = torch.randperm(128, generator=gen)[:tokens]
        yield (qkv, cos, sin, caches[0], caches[1], slots, heads, kv_heads), ATOL


def case_silu_mul():
    gen = _gen(3)
    for scale in (1.0, 40.0):
        yield (torch.randn(7, 2 * 1536, generator=gen) * scale,), ATOL


def case_lora_bgmv():
    gen = _gen(4)
    for (slots, rank), dtype in zip([([0, 2, -1, 1, 2], 8), ([3, 3, 0], 5), ([1, 0, 2], 16),
                                      ([2, -1], 4)],
                                     [torch.float32, torch.float32, torch.bfloat16, torch.float16]):
        a = torch.randn(4, 2 * rank, 40, generator=gen).to(dtype)     # --adapter-dtype weights
        bts = [torch.randn(4, rank, 24, generator=gen).to(dtype),
               torch.randn(4, rank, 16, generator=gen).to(dtype)]
        x, y = torch.randn(len(slots), 40, generator=gen), torch.randn(len(slots), 50, generator=gen)
        yield (x, y, a, bts, [0, 30], torch.tensor(slots), torch.rand(4, generator=gen)), SumBound(40 + rank + 2)


def case_dora_scale_rows():
    """Rows of a few slots scaled, others left alone; with and without a bias; y a column slice
    of a wider tensor (row stride > width), as a ConcatLinear part's output can be."""
    gen = _gen(12)
    scales = torch.rand(4, 50, generator=gen) + 0.5                      # [S, out]
    for rows, slots, biased, wide in [([0, 2, 3], [1, 3, 1], False, False), ([4, 1], [0, 2], True, False),
                                      ([5, 0, 2, 3], [2, 2, 0, 3], True, True), ([], [], True, False)]:
        y = torch.randn(6, 64 if wide else 50, generator=gen) * 3
        y = y[:, :50] if wide else y
        bias = torch.randn(50, generator=gen) if biased else None
        yield (y, torch.tensor(rows, dtype=torch.int64), torch.tensor(slots, dtype=torch.int64), scales, bias), DoraBound()


def case_argmax_rows():
    gen = _gen(5)
    for width in (1, 17, 49155):
        logits = torch.randn(6, width, generator=gen)
        logits[1, width // 2] = float("nan")
        yield (logits,), 0


def _packs(bits: int):
    """QuantPacks from every backend's real layers of that width, odd shapes and groups."""
    gen = _gen(6)
    if bits == 4:
        rows = [("bnb-nf4", False, 64, 97, 192), ("bnb-fp4", True, 64, 64, 256),
                ("bnb-nf4", True, 64, 33, 64), ("hqq-4bit", False, 32, 97, 64),
                ("hqq-3bit", False, 64, 40, 128), ("hqq-2bit", False, 16, 52, 48),
                ("hqq-4bit", False, 128, 24, 256),
                ("hqq-4bit", False, 8, 20, 40)]    # group not a multiple of 16: the unfolded path
    else:
        rows = [("bnb-int8", False, 64, 95, 200), ("eetq", False, 64, 33, 72),
                ("hqq-8bit", False, 64, 96, 192), ("hqq-8bit", False, 16, 17, 48)]
    for method, double_quant, group, out, inn in rows:
        weight, bias = torch.randn(out, inn, generator=gen) * 0.05, torch.randn(out, generator=gen)
        layer = build_linear(weight, bias, QuantSpec(method=method, bnb_double_quant=double_quant,
                                                     hqq_group_size=group))
        pack, pack_bias = layer.native_pack()
        yield pack, pack_bias


def _quant_cases(bits: int):
    gen = _gen(7)
    for pack, bias in _packs(bits):
        for rows in (1, 2, 3, 16, 65):
            x = torch.randn(rows, pack.scales.shape[1] * pack.group, generator=gen)
            for portable in (False, True):
                if bits == 4:
                    yield (x, pack.codes, pack.lut, pack.scales, pack.zeros, pack.group, bias, portable), 1e-4
                else:
                    yield (x, pack.codes, pack.scales, pack.zeros, pack.group, bias, portable), 1e-4


def case_quant_linear_4bit():
    yield from _quant_cases(4)


def case_quant_linear_8bit():
    yield from _quant_cases(8)


def case_packed_linear():
    if not onednn_supported(torch.float32, "cpu"):
        pytest.skip("no oneDNN in this torch build")
    gen = _gen(8)
    for rows in (1, 7, 65):
        weight = torch.randn(40, 24, generator=gen)
        # the fast path takes the packed weight: (fast args, twin args)
        yield ((torch.randn(rows, 24, generator=gen), pack_weight(weight), None), weight), SumBound(24 + 1)


def case_int8_weight_only_linear():
    gen = _gen(9)
    w = torch.randint(-127, 128, (30, 20), generator=gen, dtype=torch.int8)
    yield (torch.randn(5, 20, generator=gen), w, torch.rand(30, generator=gen), torch.randn(30)), SumBound(20 + 2, weights_are_ints=True)


def _stack_parts(weight: torch.Tensor, outs: list[int]):
    """A ConcatLinear-like projection for decode_stack: rows split into an hqq-4bit part, an
    eetq (8-bit) part and a dense part, each as (tensors, kind, group)."""
    q, k, v = weight.split(outs)
    pack4, bias4 = build_linear(q, None, QuantSpec(method="hqq-4bit", hqq_group_size=16)).native_pack()
    pack8, bias8 = build_linear(k, None, QuantSpec(method="eetq")).native_pack()
    return [([pack4.codes, pack4.lut, pack4.scales, pack4.zeros, bias4], 2, pack4.group),
            ([pack8.codes, pack8.scales, pack8.zeros, bias8], 3, pack8.group),
            ([v.contiguous(), None], 0, 0)]


def case_decode_stack():
    """Two layers of a small GQA model, GEMMs mixing F.linear and oneDNN prepacked weights (and a
    qkv bias); row counts on and off the prepacked GEMM's row buckets (11 pads to 16)."""
    gen = _gen(11)
    hidden, heads, kv_heads, head_dim, inter, layers, bs = 64, 4, 2, 16, 96, 2, 4
    packed = onednn_supported(torch.float32, "cpu")
    shapes = [((heads + 2 * kv_heads) * head_dim, hidden), (hidden, heads * head_dim), (2 * inter, hidden),
              (hidden, inter)]
    tensors, kinds, groups = [], [], []                  # per projection, per part
    for layer in range(layers):
        for i, shape in enumerate(shapes):
            weight = torch.randn(*shape, generator=gen) * 0.1
            bias = torch.randn(shape[0], generator=gen) if i == 0 and layer == 0 else None
            if layer == 1 and i == 0:                    # qkv as three parts: 4-bit, 8-bit, dense
                parts = _stack_parts(weight, [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim])
                tensors.append([t for t, _, _ in parts])
                kinds.append([k for _, k, _ in parts])
                groups.append([g for _, _, g in parts])
                continue
            kind = 1 if packed and (layer + i) % 2 else 0
            tensors.append([[pack_weight(weight) if kind else weight, bias]])
            kinds.append([kind])
            groups.append([0])
    norms = [torch.rand(hidden, generator=gen) + 0.5 for _ in range(2 * layers + 1)]
    subs = [(heads * head_dim, kv_heads * head_dim, kv_heads * head_dim), (hidden,), (inter, inter), (hidden,)]
    slots_n, rank = 3, 4
    lora_a, lora_bts, lora_cols = [], [], []
    for index in range(4 * layers):                      # LoRA on every projection but layer 1's o
        shape, outs = shapes[index % 4], subs[index % 4]
        if index == 5:
            lora_a.append(None), lora_bts.append([]), lora_cols.append([])
            continue
        lora_a.append(torch.randn(slots_n, len(outs) * rank, shape[1], generator=gen) * 0.1)
        lora_bts.append([torch.randn(slots_n, rank, out, generator=gen) * 0.1 for out in outs])
        lora_cols.append([sum(outs[:m]) for m in range(len(outs))])
    dora_scales, dora_biases = [], []                    # DoRA factors on every projection but layer 0's o
    for index in range(4 * layers):
        out = shapes[index % 4][0]
        dora_scales.append(None if index == 1 else torch.rand(slots_n, out, generator=gen) + 0.5)
        dora_biases.append(tensors[0][0][1] if index == 0 else None)   # layer 0's qkv has a bias
    for rows, window in [(1, 0), (5, 3), (11, 0)]:
        lens = torch.randint(1, 4 * bs, (rows,), generator=gen)
        tables = torch.randperm(rows * 4, generator=gen).view(rows, 4)
        last = lens - 1
        slots = tables.gather(1, (last // bs).unsqueeze(1)).squeeze(1) * bs + last % bs
        k_caches = [torch.randn(rows * 4, bs, kv_heads, head_dim, generator=gen) for _ in range(layers)]
        v_caches = [torch.randn(rows * 4, bs, kv_heads, head_dim, generator=gen) for _ in range(layers)]
        cos, sin = torch.rand(rows, head_dim, generator=gen), torch.rand(rows, head_dim, generator=gen)
        args = (torch.randn(rows, hidden, generator=gen), norms, tensors, kinds, groups, cos, sin,
                k_caches, v_caches, slots, tables, lens, head_dim ** -0.5, window, 1e-5, heads, kv_heads)
        no_dora = ([], [], None, None)
        yield args + ([], [], [], None, None) + no_dora, 1e-4
        token_slots = torch.randint(-1, slots_n, (rows,), generator=gen)     # -1: no adapter
        lora = (lora_a, lora_bts, lora_cols, token_slots, torch.rand(slots_n, generator=gen) + 0.5)
        yield args + lora + no_dora, 1e-4
        dora_rows = torch.nonzero(torch.isin(token_slots, torch.tensor([0, 2]))).flatten()   # slots 0, 2: DoRA
        yield args + lora + (dora_scales, dora_biases, dora_rows, token_slots[dora_rows]), 1e-4


CASES = {name.removeprefix("case_"): fn for name, fn in globals().items() if name.startswith("case_")}
INPLACE = {"add_rms_norm", "rope_write_kv", "lora_bgmv", "decode_stack", "dora_scale_rows"}   # ops whose tensor arguments are outputs
IMPLS = [(op.name, backend) for op in KERNEL_OPS for backend, _ in op.impls]


def test_every_op_has_a_case_and_a_twin_named_by_the_rule():
    assert {op.name for op in KERNEL_OPS} == set(CASES)
    for op in KERNEL_OPS:
        assert op.ref.endswith(f":{op.name}_ref"), f"{op.name}'s twin must be named {op.name}_ref"
        assert callable(reference(op.name))
        assert op.impls and all(b in ("native", "torch", "triton") for b, _ in op.impls)


def test_every_native_kernel_is_registered(native_kernels):
    bound = {name for name in dir(native_kernels) if not name.startswith("_")} - {"quant_isa"}
    registered = {op.impl("native") for op in KERNEL_OPS if op.impl("native")}
    assert bound == registered
    assert native_kernels.quant_isa() in ("avx2", "portable")


def _copy(value):
    if torch.is_tensor(value):
        return value.clone() if value.layout == torch.strided else value   # oneDNN: read-only
    if isinstance(value, (list, tuple)):
        return type(value)(_copy(v) for v in value)
    return value


def _tensors(args):
    """The strided tensors among args, lists of tensors (per-layer caches) flattened."""
    for value in args:
        if isinstance(value, (list, tuple)):
            yield from _tensors(value)
        elif torch.is_tensor(value) and value.layout == torch.strided:
            yield value


def _run(fn, args):
    args = _copy(args)
    out = fn(*args)
    return out, args


def _wide(value, transform, ints: bool = False):
    """Float tensors -> float64 (then `transform`); integer weights (`ints`) -> `transform`;
    anything else (ids, slots, sizes) unchanged."""
    if torch.is_tensor(value) and value.layout == torch.strided and value.is_floating_point():
        return transform(value.double())
    if ints and torch.is_tensor(value) and value.layout == torch.strided:
        return transform(value)
    if isinstance(value, (list, tuple)):
        return type(value)(_wide(v, transform, ints) for v in value)
    return value


def _check_sum_bound(twin, args, bound: SumBound, name: str, *results) -> None:
    terms = bound.terms
    exact_out, exact_after = _run(twin, _wide(args, lambda t: t))
    magnitude_out, magnitude_after = _run(twin, _wide(args, torch.abs, bound.weights_are_ints))
    for label, (out, after) in zip(("fast", "twin"), results):
        if out is not None:
            assert_within_bound(out, exact_out, magnitude_out, terms, what=f"{label} {name}")
        if name in INPLACE:
            for got, exact, magnitude in zip(_tensors(after), _tensors(exact_after), _tensors(magnitude_after)):
                if got.is_floating_point():
                    assert_within_bound(got, exact, magnitude, terms, what=f"{label} {name} (in place)")


def _check_dora_bound(twin, args, *results) -> None:
    y, rows, slots, scales, bias = args
    _, exact_after = _run(twin, _wide(args, lambda t: t))
    bias_abs = torch.zeros(y.shape[1], dtype=torch.float64) if bias is None else bias.double().abs()
    magnitude = y.double().abs()
    magnitude[rows] = bias_abs + scales.double().abs()[slots] * (magnitude[rows] + bias_abs)   # [Td, out]
    unscaled = torch.ones(y.shape[0], dtype=torch.bool)
    unscaled[rows] = False
    for label, got in zip(("fast", "twin"), results):
        assert_within_bound(got, exact_after[0], magnitude, 3, what=f"{label} dora_scale_rows")
        assert torch.equal(got[unscaled], y[unscaled]), f"{label} dora_scale_rows changed rows not listed"


@pytest.mark.parametrize("name,backend", IMPLS, ids=[f"{n}-{b}" for n, b in IMPLS])
def test_implementation_matches_twin(name, backend, request):
    native = request.getfixturevalue("native_kernels") if backend == "native" else None
    if backend == "triton":
        # Triton rows run in a subprocess per case, on CPU through the interpreter
        # (test_triton_interpreter.py) and on CUDA in tests/gpu/test_triton_kernels.py.
        pytest.skip("Triton kernels are checked by test_triton_interpreter.py and tests/gpu")
    fast, twin = implementation(name, backend, native), reference(name)
    for args, atol in CASES[name]():
        fast_args, twin_args = args, args
        if name == "packed_linear":
            fast_args, weight = args
            twin_args = (fast_args[0], weight, fast_args[2])
        fast_out, fast_after = _run(fast, fast_args)
        twin_out, twin_after = _run(twin, twin_args)
        if isinstance(atol, SumBound):
            _check_sum_bound(twin, twin_args, atol, name, (fast_out, fast_after), (twin_out, twin_after))
            continue
        if isinstance(atol, DoraBound):
            _check_dora_bound(twin, twin_args, fast_after[0], twin_after[0])
            continue
        if fast_out is not None or twin_out is not None:
            torch.testing.assert_close(fast_out, twin_out, atol=atol, rtol=atol)
        if name in INPLACE:                   # in-place ops: every tensor argument agrees too
            for got, want in zip(_tensors(fast_after), _tensors(twin_after)):
                torch.testing.assert_close(got, want, atol=atol, rtol=atol)


def test_kernel_set_prefers_native_and_falls_back_to_twins(native_kernels):
    assert KernelSet().get("argmax_rows") is reference("argmax_rows")
    assert KernelSet().backend_of("silu_mul") == "ref"
    built = KernelSet(native=native_kernels)
    assert built.get("silu_mul") is native_kernels.silu_mul
    assert built.backend_of("lora_bgmv") == "native"
    assert built.backend_of("packed_linear") == "ref"        # torch impls are the layers' choice
    with pytest.raises(KeyError, match="no kernel op"):
        kernel_op("nope")


def test_pack_dequantizes_to_the_library_weights():
    """Each pack's values equal the library's own dequantized weight (bnb-int8: one rounding)."""
    gen = _gen(10)
    for method, group in [("bnb-nf4", 64), ("bnb-fp4", 64), ("hqq-2bit", 16), ("hqq-3bit", 32),
                          ("hqq-4bit", 64), ("hqq-8bit", 128), ("eetq", 64), ("bnb-int8", 64)]:
        for double_quant in (False, True) if method.startswith("bnb-") else (False,):
            weight = torch.randn(40, 256, generator=gen) * 0.05
            layer = build_linear(weight, None, QuantSpec(method=method, hqq_group_size=group,
                                                         bnb_double_quant=double_quant))
            pack, _ = layer.native_pack()
            atol = 1e-7 if method == "bnb-int8" else 0
            torch.testing.assert_close(pack.dequantize(), layer.dequantized_weight(), atol=atol, rtol=0)


def test_pack_refuses_blocks_that_straddle_rows():
    layer = build_linear(torch.randn(8, 96), None, QuantSpec(method="bnb-nf4"))   # 96 % 64 != 0
    assert layer.native_pack() is None
    assert quant.pack_int8_rows(torch.zeros(3, 5, dtype=torch.int8), torch.ones(3)).group == 5

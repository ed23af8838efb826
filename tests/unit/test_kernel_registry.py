"""Every registered kernel against its pure-torch twin, driven by the registry's table.

A new row in kernels/registry.py KERNEL_OPS needs a case here (test_every_op_has_a_case); each
case yields (args, bound): the fast implementation and the twin run on copies of the same args,
and each of them, output and every tensor argument (for in-place ops), must lie within the
bound of the exact result (float64). The bounds are derived from the computation's error
bound (tests/error_bounds.py), never a fixed atol: the kernels are built with -march=native,
so the order of their float32 sums differs per CPU (issue 31). decode_stack (a whole decode
step) is the exception: a bound composed through two layers of norms, GEMMs and attention is
too loose to catch a 1e-3 mistake, so the native stack is compared with its twin composed of
the same native kernels (SAME_KERNELS), which must be bit-equal on any CPU: each kernel is
checked against its own twin within its bound here, and this checks the composition.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import contextlib
import functools

import pytest
import torch

from error_bounds import (assert_within, attention_bound, dot_bound, exact_rms_norm, rms_norm_bound,
                          rope_magnitude_sin, silu_mul_bound)
from loraplex.server.kernels import quant
from loraplex.server.kernels.registry import (KERNEL_OPS, KernelSet, implementation, kernel_op,
                                              reference)
from loraplex.server.layers.base import QuantSpec
from loraplex.server.layers.cpu_gemm import onednn_supported, pack_weight
from loraplex.server.layers.factory import build_linear

Pair = tuple[torch.Tensor, torch.Tensor]              # (exact value, elementwise bound), float64


@dataclass(frozen=True)
class Expected:
    """The exact results of one call and their bounds: the returned tensor (None: returns
    nothing) and, for in-place ops, every strided tensor argument after the call (in
    _tensors(args) order; None: not an in-place op)."""

    out: Pair | None
    after: list[Pair] | None = None


Bound = Callable[[Callable, tuple], Expected]        # (twin, args) -> Expected
EXACT = "exact"                                       # integer results: equal to the twin's


def sum_bound(terms: int, magnitude_args: Callable[[tuple], tuple] | None = None) -> Bound:
    """The op is a sum of products of its float inputs (linear in each): exact = the twin run
    in float64; bound = gamma_terms x the twin run on `magnitude_args(float64 args)` (default:
    every float tensor's absolute value), which is each element's sum of |products|."""
    def bound(twin, args) -> Expected:
        wide = _wide(args)
        exact_out, exact_after = _run(twin, wide)
        magnitude_out, magnitude_after = _run(twin, (magnitude_args or _abs_floats)(wide))
        out = None if exact_out is None else (exact_out, dot_bound(magnitude_out.abs(), terms))
        # .abs(): an input the magnitude run passed signed (rope's sin) comes back as it went in
        after = [(e, dot_bound(m.abs(), terms)) for e, m in zip(_tensors(exact_after), _tensors(magnitude_after))]
        return Expected(out, after)
    return bound


def attention_bounds(scale_at: int) -> Bound:
    """q, k_cache, v_cache first, the softmax scale at args[scale_at]: exact = the twin in
    float64, bound = error_bounds.attention_bound (scores, softmax, weighted sum of values)."""
    def bound(twin, args) -> Expected:
        wide = _wide(args)
        q, k_cache, v_cache = wide[:3]
        values = twin(q, k_cache, v_cache.abs(), *wide[3:])
        num_keys = args[3].shape[1] * k_cache.shape[1]               # the block tables' capacity
        return Expected((twin(*wide), attention_bound(q, k_cache, args[scale_at], num_keys, values)))
    return bound


def add_rms_norm_bounds(_twin, args) -> Expected:
    """rms_norm(residual + x) within error_bounds.rms_norm_bound; the residual (written in
    place) is one rounded add, x and the weight are unchanged."""
    x, residual, weight, eps = args
    total = x.double() if residual is None else x.double() + residual.double()
    out = exact_rms_norm(total, weight, eps)
    after = [(t.double(), torch.zeros(t.shape, dtype=torch.float64)) for t in _tensors(args)]
    if residual is not None:
        after[1] = (total, torch.zeros_like(total))                  # assert_within adds u |exact|
    return Expected((out, rms_norm_bound(out, x.shape[1])), after)


def silu_mul_bounds(_twin, args) -> Expected:
    gate, up = args[0].double().chunk(2, dim=-1)
    return Expected((torch.nn.functional.silu(gate) * up, silu_mul_bound(args[0])))


def _rope_magnitude_args(args: tuple) -> tuple:
    """|qkv|, |cos| and rope_magnitude_sin(sin): the rotation run on them is x's sum of |products|."""
    qkv, cos, sin, *rest = args
    return (qkv.abs(), cos.abs(), rope_magnitude_sin(sin), *_abs_floats(tuple(rest)))


def _quant_magnitude_args(args: tuple) -> tuple:
    """Dequantized as (|raw| + |zero|) |scale| (raw: lut[code] or the code) with |x|, |bias|:
    the folded kernel path sums code x activation and zero x activation apart."""
    def neg_abs(t):
        return None if t is None else -t.abs()
    if len(args) == 8:                                                 # 4-bit
        x, codes, lut, scales, zeros, group, bias, portable = args
        return (x.abs(), codes, lut.abs(), scales.abs(), neg_abs(zeros), group, _abs_floats((bias,))[0], portable)
    x, codes, scales, zeros, group, bias, portable = args
    return (x.abs(), codes.to(torch.int16).abs(), scales.abs(), neg_abs(zeros), group, _abs_floats((bias,))[0],
            portable)


def _int_weight_magnitude_args(args: tuple) -> tuple:
    """int8_weight_only_linear (x, int8 weight, scales, bias): |weight| too (it is no id)."""
    return _abs_floats(args[:1]) + (args[1].abs(),) + _abs_floats(args[2:])


SAME_KERNELS = "same kernels"      # decode_stack: bit-equal to its twin run on the native kernels


@contextlib.contextmanager
def twin_on_native_kernels(native):
    """decode_stack_ref calling the native kernels (each checked against its twin by its own row)
    instead of their twins: the composition the native decode_stack must reproduce bit for bit."""
    from loraplex.server.model import decode_stack

    swapped = {"add_rms_norm_ref": native.add_rms_norm, "rope_write_kv_ref": native.rope_write_kv,
               "decode_attention_ref": native.decode_attention, "silu_mul_ref": native.silu_mul,
               "lora_bgmv_ref": native.lora_bgmv, "dora_scale_rows_ref": native.dora_scale_rows,
               "part_linear": functools.partial(decode_stack.part_linear, quant4=native.quant_linear_4bit,
                                                quant8=native.quant_linear_8bit)}
    saved = {name: getattr(decode_stack, name) for name in swapped}
    try:
        for name, kernel in swapped.items():
            setattr(decode_stack, name, kernel)
        yield decode_stack.decode_stack_ref
    finally:
        for name, original in saved.items():
            setattr(decode_stack, name, original)


def dora_scale_rows_bounds(twin, args) -> Expected:
    """dora_scale_rows rounds three float32 operations per element, bias + f * (y - bias), and
    sums nothing: within gamma_3 x (|bias| + |f| (|y| + |bias|)) of the twin run in float64 on
    the scaled rows; rows not listed, and every other argument, come back unchanged."""
    y, rows, slots, scales, bias = args
    _, exact_after = _run(twin, _wide(args))
    bias_abs = torch.zeros(y.shape[1], dtype=torch.float64) if bias is None else bias.double().abs()
    magnitude = torch.zeros(y.shape, dtype=torch.float64)                       # unscaled rows: exact
    magnitude[rows] = bias_abs + scales.double().abs()[slots] * (y.double().abs()[rows] + bias_abs)   # [Td, out]
    after = [(t.double() if t.is_floating_point() else t, torch.zeros(t.shape, dtype=torch.float64))
             for t in _tensors(args)]
    after[0] = (exact_after[0], dot_bound(magnitude, 3))
    return Expected(None, after)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def case_decode_attention():
    gen = _gen(0)
    for heads, kv_heads, head_dim, window in [(9, 3, 64, 0), (4, 4, 128, 5), (6, 2, 48, 0)]:
        k_cache = torch.randn(40, 4, kv_heads, head_dim, generator=gen)
        v_cache = torch.randn(40, 4, kv_heads, head_dim, generator=gen)
        tables = torch.randperm(40, generator=gen)[:35].view(5, 7)
        q = torch.randn(5, heads, head_dim, generator=gen)
        yield (q, k_cache, v_cache, tables, torch.tensor([1, 4, 9, 17, 28]), 0.3, window), attention_bounds(5)


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
               window), attention_bounds(7)


def case_add_rms_norm():
    gen = _gen(1)
    for rows in (1, 16, 300):
        x, weight = torch.randn(rows, 576, generator=gen) * 3, torch.randn(576, generator=gen)
        yield (x, None, weight, 1e-5), add_rms_norm_bounds
        yield (x, torch.randn(rows, 576, generator=gen), weight, 1e-5), add_rms_norm_bounds


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
        yield (qkv, cos, sin, caches[0], caches[1], slots, heads, kv_heads), sum_bound(3, _rope_magnitude_args)


def case_silu_mul():
    gen = _gen(3)
    for scale in (1.0, 40.0):
        yield (torch.randn(7, 2 * 1536, generator=gen) * scale,), silu_mul_bounds


def case_lora_bgmv():
    gen = _gen(4)
    for (slots, rank), dtype in zip([([0, 2, -1, 1, 2], 8), ([3, 3, 0], 5), ([1, 0, 2], 16),
                                      ([2, -1], 4)],
                                     [torch.float32, torch.float32, torch.bfloat16, torch.float16]):
        a = torch.randn(4, 2 * rank, 40, generator=gen).to(dtype)     # --adapter-dtype weights
        bts = [torch.randn(4, rank, 24, generator=gen).to(dtype),
               torch.randn(4, rank, 16, generator=gen).to(dtype)]
        x, y = torch.randn(len(slots), 40, generator=gen), torch.randn(len(slots), 50, generator=gen)
        yield (x, y, a, bts, [0, 30], torch.tensor(slots), torch.rand(4, generator=gen)), sum_bound(40 + rank + 2)


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
        yield (y, torch.tensor(rows, dtype=torch.int64), torch.tensor(slots, dtype=torch.int64), scales, bias), dora_scale_rows_bounds


def case_argmax_rows():
    gen = _gen(5)
    for width in (1, 17, 49155):
        logits = torch.randn(6, width, generator=gen)
        logits[1, width // 2] = float("nan")
        yield (logits,), EXACT


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
            terms = sum_bound(x.shape[1] + 6, _quant_magnitude_args)   # + dequantize, folding, bias
            for portable in (False, True):
                if bits == 4:
                    yield (x, pack.codes, pack.lut, pack.scales, pack.zeros, pack.group, bias, portable), terms
                else:
                    yield (x, pack.codes, pack.scales, pack.zeros, pack.group, bias, portable), terms


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
        yield ((torch.randn(rows, 24, generator=gen), pack_weight(weight), None), weight), sum_bound(24 + 1)


def case_int8_weight_only_linear():
    gen = _gen(9)
    w = torch.randint(-127, 128, (30, 20), generator=gen, dtype=torch.int8)
    yield (torch.randn(5, 20, generator=gen), w, torch.rand(30, generator=gen), torch.randn(30)), sum_bound(20 + 2, _int_weight_magnitude_args)


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
        yield args + ([], [], [], None, None) + no_dora, SAME_KERNELS
        token_slots = torch.randint(-1, slots_n, (rows,), generator=gen)     # -1: no adapter
        lora = (lora_a, lora_bts, lora_cols, token_slots, torch.rand(slots_n, generator=gen) + 0.5)
        yield args + lora + no_dora, SAME_KERNELS
        dora_rows = torch.nonzero(torch.isin(token_slots, torch.tensor([0, 2]))).flatten()   # slots 0, 2: DoRA
        yield args + lora + (dora_scales, dora_biases, dora_rows, token_slots[dora_rows]), SAME_KERNELS


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


def _wide(value):
    """Float tensors -> float64 copies; anything else (ids, slots, sizes, oneDNN weights) as is."""
    if torch.is_tensor(value) and value.layout == torch.strided and value.is_floating_point():
        return value.double()
    if isinstance(value, (list, tuple)):
        return type(value)(_wide(v) for v in value)
    return value


def _abs_floats(value):
    """|float tensors| (in args, lists and tuples); anything else as is."""
    if torch.is_tensor(value) and value.layout == torch.strided and value.is_floating_point():
        return value.abs()
    if isinstance(value, (list, tuple)):
        return type(value)(_abs_floats(v) for v in value)
    return value


def _check(expected: Expected, got_out, got_args, what: str) -> None:
    """got_out and (for in-place ops) every float tensor argument within its bound; integer
    arguments unchanged."""
    if expected.out is not None:
        assert_within(got_out, *expected.out, what=what)
    if expected.after is None:
        return
    got = list(_tensors(got_args))
    assert len(got) == len(expected.after)
    for index, (tensor, (exact, bound)) in enumerate(zip(got, expected.after)):
        if tensor.is_floating_point():
            assert_within(tensor, exact, bound, what=f"{what} (tensor argument {index} after the call)")
        else:
            assert torch.equal(tensor, exact), f"{what}: integer argument {index} changed"


@pytest.mark.parametrize("name,backend", IMPLS, ids=[f"{n}-{b}" for n, b in IMPLS])
def test_implementation_matches_twin(name, backend, request):
    native = request.getfixturevalue("native_kernels") if backend == "native" else None
    if backend == "triton":
        # Triton rows run in a subprocess per case, on CPU through the interpreter
        # (test_triton_interpreter.py) and on CUDA in tests/gpu/test_triton_kernels.py.
        pytest.skip("Triton kernels are checked by test_triton_interpreter.py and tests/gpu")
    fast, twin = implementation(name, backend, native), reference(name)
    for args, bound in CASES[name]():
        fast_args, twin_args = args, args
        if name == "packed_linear":
            fast_args, weight = args
            twin_args = (fast_args[0], weight, fast_args[2])
        fast_out, fast_after = _run(fast, fast_args)
        twin_out, twin_after = _run(twin, twin_args)
        if bound == EXACT:
            assert torch.equal(fast_out, twin_out)
            continue
        if bound == SAME_KERNELS:
            with twin_on_native_kernels(native) as composed:
                want_out, want_after = _run(composed, twin_args)
            assert torch.equal(fast_out, want_out), f"{name}: not bit-equal to its twin on the same kernels"
            assert all(torch.equal(got, want) for got, want in zip(_tensors(fast_after), _tensors(want_after)))
            continue
        expected = bound(twin, twin_args)
        if name not in INPLACE:
            expected = Expected(expected.out)
        _check(expected, fast_out, fast_after, f"fast {name}")
        _check(expected, twin_out, twin_after, f"twin {name}")


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

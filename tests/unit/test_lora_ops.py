"""LoRA delta ops: the reference against a direct oracle, the fast torch routes against the reference."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from error_bounds import assert_within, assert_within_bound, dot_bound
from lora_helpers import HIDDEN, INTER, make_adapter, make_targets, oracle_delta
from loraplex.server.lora.batch_info import LoraBatchInfo
from loraplex.server.lora.ops import ReferenceOps, TorchOps, select_ops
from loraplex.server.lora.ops import reference as ref
from loraplex.server.lora.ops.torch_ops import grouped_delta, padded_delta
from loraplex.server.lora.slot_pool import SlotPool

# Mixed batch: a prefill of slot 2 (5 tokens), a base-only prefill (3), a prefill of slot 0 (4),
# then decodes for slots 1, -1, 3, 2 (slot 2 again: two runs of one slot), 0.
TOKEN_SLOTS = [2] * 5 + [-1] * 3 + [0] * 4 + [1, -1, 3, 2, 0]


def _adapters():
    """Heterogeneous ranks, alphas, rsLoRA and partial target subsets."""
    return [
        make_adapter("a@1", rank=4, seed=1),
        make_adapter("b@1", rank=2, seed=2, modules=("q_proj", "v_proj", "down_proj"), alpha=8),
        make_adapter("c@1", rank=6, seed=3, modules=("k_proj", "o_proj", "up_proj"), rslora=True),
        make_adapter("d@1", rank=3, seed=4, modules=("gate_proj", "up_proj", "q_proj"), alpha=3),
    ]


def _pool(ops, dtype=torch.float32, max_loras=5):
    targets = make_targets(dtype=dtype)
    pool = SlotPool(targets, max_loras, 8, dtype, "cpu", ops=ops)
    adapters = _adapters()
    for slot, adapter in enumerate(adapters):
        pool.load(slot, adapter)
    return pool, targets, adapters


def _inputs(dtype=torch.float32):
    gen = torch.Generator().manual_seed(7)
    num_tokens = len(TOKEN_SLOTS)
    return {HIDDEN: torch.randn(num_tokens, HIDDEN, generator=gen).to(dtype),
            INTER: torch.randn(num_tokens, INTER, generator=gen).to(dtype)}


def test_reference_matches_direct_oracle():
    pool, targets, adapters = _pool(ReferenceOps())
    info = LoraBatchInfo.from_token_slots(torch.tensor(TOKEN_SLOTS))
    xs = _inputs()
    per_token = [adapters[s] if s >= 0 else None for s in TOKEN_SLOTS]
    for target in targets:
        x = xs[target.in_features]
        y = torch.zeros(len(TOKEN_SLOTS), target.out_features)
        target.lora.add_delta(x, y, pool.prepare_step(info))
        magnitude = oracle_delta(target, x, per_token, absolute=True)
        assert_within(y, oracle_delta(target, x, per_token), dot_bound(magnitude, x.shape[1] + 8 + 2),
                      what=f"reference target {target.layer_idx}:{target.sub_names}")   # pool rank <= 8
    assert y[5:8].abs().sum() == 0 and y[13].abs().sum() == 0          # slot -1 rows get nothing


def _exact_delta(x, y, weights, info, scales):
    """(exact y + delta, sum of |products| + |y|) in float64 through the reference (error_bounds.py)."""
    def run(transform):
        out = transform(y.double())
        wide = replace(weights, a=transform(weights.a.double()), bts=tuple(transform(bt.double()) for bt in weights.bts))
        ref.add_delta(transform(x.double()), out, wide, ref.prepare(info, scales.double()))
        return out
    return run(lambda t: t), run(torch.abs)


def _delta_terms(x, weights) -> int:
    return x.shape[1] + weights.rank + 2             # shrink sum, expand sum, scale, add into y


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("route", [padded_delta, grouped_delta])
def test_fast_routes_match_reference(route, dtype):
    """Adapters and compute in `dtype`: fast route and reference within the bound of their sums."""
    pool, targets, _ = _pool(TorchOps(), dtype)
    info = LoraBatchInfo.from_token_slots(torch.tensor(TOKEN_SLOTS))
    step = pool.prepare_step(info)
    xs = _inputs(dtype)
    for i, target in enumerate(targets):
        x = xs[target.in_features]
        y_base = target.base.linear(x)
        y_fast, y_ref = y_base.clone(), y_base.clone()
        exact, magnitude = _exact_delta(x, y_base, pool.weights[i], info, pool.scales)
        route(x, y_fast, pool.weights[i], step.plan)
        ref.add_delta(x, y_ref, pool.weights[i], ref.prepare(info, pool.scales))
        terms = _delta_terms(x, pool.weights[i])
        assert_within_bound(y_fast, exact, magnitude, terms, dtype, what=f"{route.__name__} target {i}")
        assert_within_bound(y_ref, exact, magnitude, terms, dtype, what=f"reference target {i}")


def test_float32_adapters_with_bf16_activations():
    """Default adapter dtype float32 under a bf16 model: x is cast up, the delta summed in
    float32 and cast back: within the float32 sums' bound plus one bfloat16 rounding of the
    result (assert_within adds it for a bfloat16 tensor)."""
    pool, targets, adapters = _pool(TorchOps(), torch.float32)
    info = LoraBatchInfo.from_token_slots(torch.tensor(TOKEN_SLOTS))
    xs = _inputs(torch.bfloat16)
    per_token = [adapters[s] if s >= 0 else None for s in TOKEN_SLOTS]
    for target in targets[:4]:
        x = xs[target.in_features]
        y_fast = torch.zeros(len(TOKEN_SLOTS), target.out_features, dtype=torch.bfloat16)
        y_ref = y_fast.clone()
        target.lora.add_delta(x, y_fast, pool.prepare_step(info))
        ref.add_delta(x, y_ref, pool.weights[targets.index(target)], ref.prepare(info, pool.scales))
        exact = oracle_delta(target, x, per_token)
        bound = dot_bound(oracle_delta(target, x, per_token, absolute=True), x.shape[1] + 8 + 2)
        for got, what in ((y_fast, "torch route"), (y_ref, "reference")):
            assert_within(got, exact, bound, what=f"bf16 {what} target {targets.index(target)}")


@pytest.mark.parametrize("slots", [[3, 1, 4, 0, 2], [0, 0, 0, 2, -1, 2], [-1, 4, -1, 1, 1, 1, 1], [-1, -1]])
def test_torch_bgmv_sgmv_match_reference(slots):
    gen = torch.Generator().manual_seed(len(slots))
    a = torch.randn(5, 7, 11, generator=gen)          # [S, Ra, in]
    bt = torch.randn(5, 7, 9, generator=gen)          # [S, R, out]
    scales = torch.rand(5, generator=gen) + 0.5
    x = torch.randn(len(slots), 11, generator=gen)
    info = LoraBatchInfo.from_token_slots(torch.tensor(slots))
    fast = TorchOps()
    # each against the reference run in float64, within the bound of its float32 sums
    h_exact, h_magnitude = ref.bgmv_shrink(x.double(), a.double(), info.token_slots), \
        ref.bgmv_shrink(x.double().abs(), a.double().abs(), info.token_slots)
    h_bound = dot_bound(h_magnitude, x.shape[1])
    h_ref = ref.bgmv_shrink(x, a, info.token_slots)
    assert_within(h_ref, h_exact, h_bound, what="reference bgmv_shrink")
    assert_within(fast.bgmv_shrink(x, a, info.token_slots), h_exact, h_bound, what="bgmv_shrink")
    assert_within(ref.sgmv_shrink(x, a, info.seg_starts, info.seg_lens, info.seg_slots), h_exact, h_bound,
                  what="reference sgmv_shrink")
    assert_within(fast.sgmv_shrink(x, a, info.seg_starts, info.seg_lens, info.seg_slots), h_exact, h_bound,
                  what="sgmv_shrink")
    y_start = torch.randn(len(slots), 12, generator=gen)
    y_exact, y_magnitude = y_start.double(), y_start.double().abs()
    ref.bgmv_expand(h_ref.double(), bt.double(), info.token_slots, scales.double(), y_exact, 2)
    ref.bgmv_expand(h_ref.double().abs(), bt.double().abs(), info.token_slots, scales.double(), y_magnitude, 2)
    outs = [y_start.clone() for _ in range(4)]
    ref.bgmv_expand(h_ref, bt, info.token_slots, scales, outs[0], 2)
    fast.bgmv_expand(h_ref, bt, info.token_slots, scales, outs[1], 2)
    ref.sgmv_expand(h_ref, bt, info.seg_starts, info.seg_lens, info.seg_slots, scales, outs[2], 2)
    fast.sgmv_expand(h_ref, bt, info.seg_starts, info.seg_lens, info.seg_slots, scales, outs[3], 2)
    for i, out in enumerate(outs):                       # the same h: rank-7 sums, a scale, an add
        assert_within(out, y_exact, dot_bound(y_magnitude, 7 + 2), what=f"expand {i}")


def test_route_choice_follows_batch_shape():
    pool, _, _ = _pool(TorchOps())
    fast: TorchOps = pool.ops
    weights = pool.weights[2]                                  # gate_up of layer 0
    decode = pool.prepare_step(LoraBatchInfo.from_token_slots(torch.tensor([0, 1, 2, 3])))
    assert fast.choose_route(weights, decode.plan) == "padded"
    lopsided = pool.prepare_step(LoraBatchInfo.from_token_slots(torch.tensor([0] * 20000 + [1, 2, 3])))
    assert fast.choose_route(weights, lopsided.plan) == "grouped"


def test_projection_forward_adds_delta_through_hook():
    pool, targets, adapters = _pool(TorchOps())
    info = LoraBatchInfo.from_token_slots(torch.tensor(TOKEN_SLOTS))
    target = targets[2]
    x = _inputs()[HIDDEN]
    per_token = [adapters[s] if s >= 0 else None for s in TOKEN_SLOTS]
    weight = target.base.dequantized_weight().double()                      # [out, in], no bias
    expected = x.double() @ weight.T + oracle_delta(target, x, per_token)
    magnitude = x.double().abs() @ weight.abs().T + oracle_delta(target, x, per_token, absolute=True)
    # base GEMM (in terms), the delta (in + rank + scale), the add: any order
    assert_within(target(x, pool.prepare_step(info)), expected, dot_bound(magnitude, x.shape[1] + 8 + 3),
                  what="projection with its LoRA hook")
    torch.testing.assert_close(target(x, None), target.base.linear(x))


def test_select_ops_on_cpu():
    assert select_ops("cpu").name == "torch"
    assert select_ops("cpu", "reference").name == "reference"
    with pytest.raises(ValueError, match="triton"):
        select_ops("cpu", "triton")
    with pytest.raises(ValueError, match="unknown"):
        select_ops("cpu", "cuda-magic")


# ---- the fused native kernel (kernels/csrc/lora.cpp lora_bgmv) --------------------------------

@pytest.mark.parametrize("slots", [[3, 1, 4, 0, 2], [0, 0, 2, -1, 2], [-1, -1], [1]])
@pytest.mark.parametrize("rank", [4, 7, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_native_bgmv_matches_twin(native_kernels, slots, rank, dtype):
    """Every --adapter-dtype; in and out widths off the kernels' 4/8/16-wide blocks, ranks off 4."""
    gen = torch.Generator().manual_seed(len(slots) * rank)
    subs, in_features, outs = 3, 53, (24, 8, 13)
    a = torch.randn(5, subs * rank, in_features, generator=gen).to(dtype)       # [S, subs * R, in]
    bts = [torch.randn(5, rank, out, generator=gen).to(dtype) for out in outs]  # [S, R, out_m]
    col_starts = [0, 24, 32]
    scales = torch.rand(5, generator=gen) + 0.5
    token_slots = torch.tensor(slots)
    x = torch.randn(len(slots), in_features + 3, generator=gen)[:, :in_features]   # strided rows
    y_native = torch.randn(len(slots), 50, generator=gen)
    y_twin = y_native.clone()
    exact, magnitude = _exact_bgmv(x, y_native, a, bts, col_starts, token_slots, scales)
    native_kernels.lora_bgmv(x, y_native, a, bts, col_starts, token_slots, scales)
    ref.lora_bgmv_ref(x, y_twin, a, bts, col_starts, token_slots, scales)
    terms = in_features + rank + 2                   # shrink sum, expand sum, scale, add into y
    assert_within_bound(y_native, exact, magnitude, terms, what="native lora_bgmv")
    assert_within_bound(y_twin, exact, magnitude, terms, what="twin lora_bgmv_ref")


def _exact_bgmv(x, y, a, bts, col_starts, token_slots, scales):
    """(exact result, sum of |products| per element), both in float64 (error_bounds.py)."""
    def run(transform):
        out = transform(y.double())
        ref.lora_bgmv_ref(transform(x.double()), out, transform(a.double()),
                          [transform(bt.double()) for bt in bts], col_starts, token_slots, scales.double())
        return out
    return run(lambda t: t), run(torch.abs)


def test_native_bgmv_refuses_bad_slots(native_kernels):
    a, bt = torch.zeros(2, 4, 8), torch.zeros(2, 4, 6)
    with pytest.raises(RuntimeError, match="token 1 has slot 2"):
        native_kernels.lora_bgmv(torch.zeros(2, 8), torch.zeros(2, 6), a, [bt], [0],
                                 torch.tensor([0, 2]), torch.ones(2))
    with pytest.raises(RuntimeError, match="columns fall outside y"):
        native_kernels.lora_bgmv(torch.zeros(2, 8), torch.zeros(2, 6), a, [bt], [3],
                                 torch.tensor([0, 1]), torch.ones(2))


def test_native_route_in_torch_ops_matches_reference(native_kernels):
    """The decode rows of the mixed batch through TorchOps with the fused kernel."""
    decode_slots = [1, -1, 3, 2, 0, 3]
    pool, targets, _ = _pool(select_ops("cpu", cpu_kernels=native_kernels))
    info = LoraBatchInfo.from_token_slots(torch.tensor(decode_slots))
    step = pool.prepare_step(info)
    gen = torch.Generator().manual_seed(3)
    xs = {HIDDEN: torch.randn(6, HIDDEN, generator=gen), INTER: torch.randn(6, INTER, generator=gen)}
    for i, target in enumerate(targets):
        x = xs[target.in_features]
        y_fast = target.base.linear(x)
        y_ref = y_fast.clone()
        exact, magnitude = _exact_delta(x, y_fast, pool.weights[i], info, pool.scales)
        pool.ops.add_delta(x, y_fast, pool.weights[i], step)
        ref.add_delta(x, y_ref, pool.weights[i], ref.prepare(info, pool.scales))
        terms = _delta_terms(x, pool.weights[i])
        assert_within_bound(y_fast, exact, magnitude, terms, what=f"native route target {i}")
        assert_within_bound(y_ref, exact, magnitude, terms, what=f"reference target {i}")
    assert set(step.plan.routes.values()) == {"native"}
    prefill = pool.prepare_step(LoraBatchInfo.from_token_slots(torch.tensor([0] * 9 + [1])))
    assert not pool.ops.native_fits(xs[HIDDEN][:1].expand(10, -1), torch.zeros(10, 4),
                                    pool.weights[0], prefill.plan)    # 9 tokens of one slot: GEMMs

"""Triton SGMV/BGMV kernels against the pure-torch reference on CUDA (skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch

from lora_helpers import HIDDEN, INTER, make_adapter, make_targets
from loraplex.server.lora.batch_info import LoraBatchInfo
from loraplex.server.lora.ops import reference as ref
from loraplex.server.lora.ops import select_ops
from loraplex.server.lora.slot_pool import SlotPool

pytestmark = pytest.mark.gpu

TOKEN_SLOTS = [2] * 37 + [-1] * 3 + [0] * 20 + [1, -1, 3, 2, 0]   # prefill runs > BLOCK_M, then decodes
TOLERANCES = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


def _ops():
    ops = select_ops("cuda")
    assert ops.name == "triton", "CUDA is present: the triton backend must be selected"
    return ops


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("slots", [TOKEN_SLOTS, [3, 1, 4, 0, 2], [-1, -1]])
def test_shrink_expand_match_reference(dtype, slots):
    ops, tol = _ops(), TOLERANCES[dtype]
    gen = torch.Generator().manual_seed(len(slots))
    a = (torch.randn(5, 24, 200, generator=gen) * 0.1).to("cuda", dtype)     # [S, Ra, in]
    bt = (torch.randn(5, 8, 300, generator=gen) * 0.1).to("cuda", dtype)     # [S, R, out]
    scales = (torch.rand(5, generator=gen) + 0.5).to("cuda", dtype)
    x = torch.randn(len(slots), 200, generator=gen).to("cuda", dtype)
    info = LoraBatchInfo.from_token_slots(torch.tensor(slots, device="cuda"))
    h_ref = ref.bgmv_shrink(x, a, info.token_slots)
    torch.testing.assert_close(ops.bgmv_shrink(x, a, info.token_slots), h_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(ops.sgmv_shrink(x, a, info.seg_starts, info.seg_lens, info.seg_slots),
                               h_ref, rtol=tol, atol=tol)
    h = h_ref[:, 8:16]                                                       # a strided rank block
    y0 = torch.randn(len(slots), 320, generator=gen).to("cuda", dtype)
    y_ref, y_bgmv, y_sgmv = y0.clone(), y0.clone(), y0.clone()
    ref.bgmv_expand(h, bt, info.token_slots, scales, y_ref, 10)
    ops.bgmv_expand(h, bt, info.token_slots, scales, y_bgmv, 10)
    ops.sgmv_expand(h, bt, info.seg_starts, info.seg_lens, info.seg_slots, scales, y_sgmv, 10)
    torch.testing.assert_close(y_bgmv, y_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(y_sgmv, y_ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_delta_matches_reference_on_pool(dtype):
    ops, tol = _ops(), TOLERANCES[dtype]
    targets = make_targets(dtype=dtype)
    pool = SlotPool(targets, 5, 8, dtype, "cuda", ops=ops)
    pool.load(0, make_adapter("a@1", rank=4, seed=1))
    pool.load(1, make_adapter("b@1", rank=2, seed=2, modules=("q_proj", "down_proj")))
    pool.load(2, make_adapter("c@1", rank=8, seed=3, modules=("k_proj", "up_proj"), rslora=True))
    pool.load(3, make_adapter("d@1", rank=3, seed=4, modules=("gate_proj", "o_proj")))
    info = LoraBatchInfo.from_token_slots(torch.tensor(TOKEN_SLOTS, device="cuda"))
    gen = torch.Generator().manual_seed(0)
    xs = {n: torch.randn(len(TOKEN_SLOTS), n, generator=gen).to("cuda", dtype) for n in (HIDDEN, INTER)}
    for i, target in enumerate(targets):
        x = xs[target.in_features]
        y_fast = torch.zeros(len(TOKEN_SLOTS), target.out_features, device="cuda", dtype=dtype)
        y_ref = y_fast.clone()
        target.lora.add_delta(x, y_fast, pool.prepare_step(info))
        ref.add_delta(x, y_ref, pool.weights[i], ref.prepare(info, pool.scales))
        torch.testing.assert_close(y_fast, y_ref, rtol=tol, atol=tol)

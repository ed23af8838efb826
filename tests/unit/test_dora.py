"""DoRA served unmerged: scales at load, per-row application in mixed batches, vs a float64 oracle."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from lora_helpers import MODULE_SHAPES, make_adapter, make_targets
from loraplex.server.layers.base import QuantSpec
from loraplex.server.layers.dense import DenseLinear
from loraplex.server.layers.proj import ProjLinear
from loraplex.server.lora.batch_info import LoraBatchInfo
from loraplex.server.lora.dora import DoraScaleError, base_bias
from loraplex.server.lora.ops import ReferenceOps, TorchOps
from loraplex.server.lora.slot_pool import SlotPool


def dora_adapter(key: str, rank: int, seed: int, modules=tuple(MODULE_SHAPES)):
    """A random LoRA plus random magnitudes (0.5..1.5 times the norms of W + s BA: not 1)."""
    adapter = make_adapter(key, rank, seed, modules=modules, num_layers=1)
    gen = torch.Generator().manual_seed(seed + 1000)
    magnitudes = {k: torch.rand(b.shape[0], generator=gen) + 0.5 for k, (_, b) in adapter.weights.items()}
    return replace(adapter, magnitudes=magnitudes)


def oracle(target: ProjLinear, x: torch.Tensor, adapters) -> torch.Tensor:
    """[T, out] float64: bias + m / ||W + s BA|| * (W x + s BA x) on DoRA rows, W x + b + s BA x else."""
    weight = target.base.dequantized_weight().double()
    bias = base_bias(target.base)
    bias = torch.zeros(weight.shape[0], dtype=torch.float64) if bias is None else bias.double()
    out = x.double() @ weight.T
    col = 0
    rows = []
    for t, adapter in enumerate(adapters):
        y = out[t].clone()
        col = 0
        for name, out_m in zip(target.sub_names, target.out_sizes):
            cols = slice(col, col + out_m)
            pair = None if adapter is None else adapter.weights.get((target.layer_idx, name))
            if pair is not None:
                a, b = (w.double() for w in pair)
                s = adapter.config.scaling
                y[cols] += s * (x[t].double() @ a.T @ b.T)
                m = adapter.magnitudes.get((target.layer_idx, name))
                if m is not None:
                    norm = torch.linalg.norm(weight[cols] + s * (b @ a), dim=1)
                    y[cols] *= m.double() / norm
            col += out_m
        rows.append(y + bias)
    return torch.stack(rows)


def biased_targets() -> list[ProjLinear]:
    """Qwen2-like q/k/v with biases, so DoRA's bias handling (b + f * (y - b)) is exercised."""
    gen = torch.Generator().manual_seed(7)
    names = ("q_proj", "k_proj", "v_proj")
    outs = tuple(MODULE_SHAPES[n][1] for n in names)
    weight = torch.randn(sum(outs), MODULE_SHAPES["q_proj"][0], generator=gen) * 0.1
    bias = torch.randn(sum(outs), generator=gen)
    return [ProjLinear(DenseLinear(weight, bias, QuantSpec()), 0, names, outs)]


@pytest.mark.parametrize("ops", [ReferenceOps(), TorchOps()], ids=["reference", "torch"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_mixed_batch_dora_plain_and_none_rows(ops, with_bias):
    targets = biased_targets() if with_bias else make_targets(num_layers=1)
    modules = ("q_proj", "k_proj", "v_proj") if with_bias else tuple(MODULE_SHAPES)
    pool = SlotPool(targets, max_loras=4, max_lora_rank=16, ops=ops)
    dora_a = dora_adapter("dora-a", 8, 1, modules)
    dora_b = dora_adapter("dora-b", 4, 2, modules[:2])            # DoRA on a subset of modules
    plain = make_adapter("plain", 16, 3, modules=modules, num_layers=1)
    by_slot = {0: pool.dora_scaler(dora_a), 1: plain, 2: dora_b}
    for slot, adapter in by_slot.items():
        pool.load(slot, adapter)
    assert pool.dora_slots == {0, 2}
    token_slots = torch.tensor([0, 0, 1, -1, 2, 2, 2, 1, 0, -1])
    step = pool.prepare_step(LoraBatchInfo.from_token_slots(token_slots))
    assert step.dora is not None and step.dora.rows.tolist() == [0, 1, 4, 5, 6, 8]
    gen = torch.Generator().manual_seed(9)
    for target in targets:
        x = torch.randn(len(token_slots), target.in_features, generator=gen)
        ours = target(x, step)
        want = oracle(target, x, [by_slot.get(int(s)) for s in token_slots])
        torch.testing.assert_close(ours.double(), want, rtol=1e-5, atol=1e-5)


def test_scales_computed_at_host_load_and_counted():
    targets = make_targets(num_layers=1)
    pool = SlotPool(targets, max_loras=2, max_lora_rank=8)
    adapter = dora_adapter("d", 4, 5, ("q_proj", "down_proj"))
    finished = pool.dora_scaler(adapter)
    assert set(finished.dora_scales) == set(adapter.magnitudes)
    extra = sum(s.nbytes for s in finished.dora_scales.values())
    assert finished.nbytes == adapter.nbytes + extra
    assert pool.dora_scaler(finished) is finished              # once per version
    target = targets[0]
    w = target.base.dequantized_weight()[: MODULE_SHAPES["q_proj"][1]]
    a, b = adapter.weights[(0, "q_proj")]
    want = adapter.magnitudes[(0, "q_proj")] / torch.linalg.norm(w + adapter.config.scaling * b @ a, dim=1)
    torch.testing.assert_close(finished.dora_scales[(0, "q_proj")], want)


def test_clearing_a_dora_slot_restores_plain_rows():
    targets = make_targets(num_layers=1)
    pool = SlotPool(targets, max_loras=2, max_lora_rank=8, ops=ReferenceOps())
    pool.load(0, dora_adapter("d", 4, 5))
    pool.clear(0)
    plain = make_adapter("p", 4, 6, num_layers=1)
    pool.load(0, plain)
    step = pool.prepare_step(LoraBatchInfo.from_token_slots(torch.tensor([0, 0])))
    assert step.dora is None and pool.dora_slots == frozenset()
    x = torch.randn(2, targets[0].in_features)
    torch.testing.assert_close(targets[0](x, step).double(), oracle(targets[0], x, [plain, plain]),
                               rtol=1e-5, atol=1e-5)


def test_zero_norm_row_is_refused():
    targets = make_targets(num_layers=1)
    with torch.no_grad():
        targets[0].base.weight[0].zero_()           # q_proj row 0: W + s BA = 0 when B's row is 0
    adapter = dora_adapter("z", 4, 8, ("q_proj",))
    a, b = adapter.weights[(0, "q_proj")]
    b[0].zero_()
    with pytest.raises(DoraScaleError, match="not finite"):
        SlotPool(targets, max_loras=1, max_lora_rank=8).dora_scaler(adapter)


@pytest.mark.parametrize("with_bias", [False, True])
def test_fused_decode_stack_sequence_equals_the_layer_path(native_kernels, with_bias):
    """What the fused decode stack runs per projection on a DoRA step (the GEMM, lora_bgmv with
    the hook's native_args, then the native dora_scale_rows with its native_dora factors) gives
    the layer path's output (delta, then apply_dora in torch) bit for bit: the native kernel
    rounds the same three operations as its twin (no FMA contraction), bias or not."""
    targets = biased_targets() if with_bias else make_targets(num_layers=1)
    modules = ("q_proj", "k_proj", "v_proj") if with_bias else tuple(MODULE_SHAPES)
    pool = SlotPool(targets, max_loras=4, max_lora_rank=16, ops=TorchOps(native_bgmv=native_kernels.lora_bgmv))
    by_slot = {0: dora_adapter("dora-a", 8, 1, modules), 1: make_adapter("plain", 16, 3, modules=modules,
                                                                         num_layers=1),
               2: dora_adapter("dora-b", 4, 2, modules[:2])}
    for slot, adapter in by_slot.items():
        pool.load(slot, pool.dora_scaler(adapter))
    token_slots = torch.tensor([0, 1, -1, 2, 0, 2])                       # decode: one token a sequence
    step = pool.prepare_step(LoraBatchInfo.from_token_slots(token_slots))
    assert step.dora is not None and step.dora.rows.tolist() == [0, 3, 4, 5]
    gen = torch.Generator().manual_seed(4)
    for target in targets:
        x = torch.randn(len(token_slots), target.in_features, generator=gen)
        layer_path = target(x, step)
        args = target.lora.native_args(step)
        assert args, "a DoRA step's delta takes the fused kernel (the stack no longer leaves it)"
        stacked = target.base_linear(x)
        native_kernels.lora_bgmv(x, stacked, *args, step.info.token_slots, step.scales)
        factors, bias = target.lora.native_dora()
        assert factors.shape == (4, sum(target.out_sizes)) and (bias is not None) == with_bias
        strided = torch.zeros(len(token_slots), factors.shape[1] + 8)[:, :factors.shape[1]]
        strided.copy_(stacked)                                            # a row stride wider than y
        for y in (stacked, strided):
            native_kernels.dora_scale_rows(y, step.dora.rows, step.dora.slots, factors, bias)
            assert torch.equal(y, layer_path), target
        assert not torch.equal(layer_path[0], target.base_linear(x)[0])


def test_plain_steps_carry_no_dora_rows():
    targets = make_targets(num_layers=1)
    pool = SlotPool(targets, max_loras=2, max_lora_rank=8, ops=TorchOps(native_bgmv=lambda *a: None))
    pool.load(0, make_adapter("plain", 4, 1, num_layers=1))
    pool.load(1, dora_adapter("d", 4, 2))
    plain_step = pool.prepare_step(LoraBatchInfo.from_token_slots(torch.tensor([0, 0])))
    dora_step = pool.prepare_step(LoraBatchInfo.from_token_slots(torch.tensor([0, 1])))
    assert plain_step.dora is None and dora_step.dora is not None
    assert targets[0].lora.native_args(plain_step) is not None and targets[0].lora.native_args(dora_step) is not None

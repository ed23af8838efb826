"""Every Triton kernel against its pure-torch twin, as named cases run on any device.

On CUDA, tests/gpu calls the cases directly. On CPU, tests/unit/test_triton_interpreter.py
runs each case in its own subprocess under Triton's interpreter (TRITON_INTERPRET=1), so
that an out-of-bounds access, which crashes the interpreter's process, is one failed case:
    TRITON_INTERPRET=1 python tests/triton_cases.py CASE DTYPE [DEVICE]
Inputs are rounded to the case's dtype once; the twin runs in float32 on those same values
and is compared after the kernel's output is read back as float32.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

TOLERANCES = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 2e-2}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# prefill runs longer than one 16-row tile, a base-only run, then one-token (decode) segments
TOKEN_SLOTS = [2] * 19 + [-1] * 3 + [0] * 5 + [1, -1, 3, 2, 0]


def _close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(actual.float(), expected.float(), rtol=tol, atol=tol, msg=lambda m: f"{what}: {m}")


def _randn(gen: torch.Generator, *shape: int, scale: float = 1.0, dtype: torch.dtype, device: str) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen) * scale).to(device, dtype)


# ---- LoRA shrink / expand (server/lora/ops/triton_ops.py vs reference.py) -------------

def _lora_inputs(dtype: torch.dtype, device: str):
    from loraplex.server.lora.batch_info import LoraBatchInfo

    gen = torch.Generator().manual_seed(7)
    a = _randn(gen, 5, 24, 72, scale=0.1, dtype=dtype, device=device)       # [S, Ra, in]: 3 K tiles
    x = _randn(gen, len(TOKEN_SLOTS), 72, dtype=dtype, device=device)       # [T, in]
    info = LoraBatchInfo.from_token_slots(torch.tensor(TOKEN_SLOTS, device=device))
    return gen, a, x, info


def case_lora_shrink(dtype: torch.dtype, device: str) -> None:
    from loraplex.server.lora.ops import reference as ref
    from loraplex.server.lora.ops.triton_ops import TritonOps

    ops = TritonOps()
    _, a, x, info = _lora_inputs(dtype, device)
    h_ref = ref.bgmv_shrink(x.float(), a.float(), info.token_slots)             # [T, Ra]
    _close(ops.bgmv_shrink(x, a, info.token_slots), h_ref, dtype, "bgmv_shrink")
    _close(ops.sgmv_shrink(x, a, info.seg_starts, info.seg_lens, info.seg_slots), h_ref, dtype,
           "sgmv_shrink")


def case_lora_expand(dtype: torch.dtype, device: str) -> None:
    from loraplex.server.lora.ops import reference as ref
    from loraplex.server.lora.ops.triton_ops import TritonOps

    ops = TritonOps()
    gen, a, x, info = _lora_inputs(dtype, device)
    h = _randn(gen, len(TOKEN_SLOTS), 24, dtype=dtype, device=device)[:, 8:16]   # a strided rank block
    bt = _randn(gen, 5, 8, 70, scale=0.1, dtype=dtype, device=device)           # [S, R, out]: 2 N tiles
    scales = (torch.rand(5, generator=gen) + 0.5).to(device, dtype)
    y0 = _randn(gen, len(TOKEN_SLOTS), 90, dtype=dtype, device=device)
    y_ref = y0.to(torch.float32, copy=True)
    ref.bgmv_expand(h.float(), bt.float(), info.token_slots, scales.float(), y_ref, 10)
    y_bgmv, y_sgmv = y0.clone(), y0.clone()
    ops.bgmv_expand(h, bt, info.token_slots, scales, y_bgmv, 10)
    ops.sgmv_expand(h, bt, info.seg_starts, info.seg_lens, info.seg_slots, scales, y_sgmv, 10)
    _close(y_bgmv, y_ref, dtype, "bgmv_expand")
    _close(y_sgmv, y_ref, dtype, "sgmv_expand")


def case_lora_add_delta(dtype: torch.dtype, device: str) -> None:
    """The whole projection delta through a real SlotPool (mixed ranks, partial targets)."""
    from lora_helpers import HIDDEN, INTER, make_adapter, make_targets
    from loraplex.server.lora.batch_info import LoraBatchInfo
    from loraplex.server.lora.ops import reference as ref
    from loraplex.server.lora.ops.triton_ops import TritonOps
    from loraplex.server.lora.slot_pool import SlotPool

    targets = make_targets(dtype=dtype)
    pool = SlotPool(targets, 5, 8, dtype, device, ops=TritonOps())
    pool.load(0, make_adapter("a@1", rank=4, seed=1))
    pool.load(1, make_adapter("b@1", rank=2, seed=2, modules=("q_proj", "down_proj")))
    pool.load(2, make_adapter("c@1", rank=8, seed=3, modules=("k_proj", "up_proj"), rslora=True))
    pool.load(3, make_adapter("d@1", rank=3, seed=4, modules=("gate_proj", "o_proj")))
    info = LoraBatchInfo.from_token_slots(torch.tensor(TOKEN_SLOTS, device=device))
    gen = torch.Generator().manual_seed(0)
    xs = {n: _randn(gen, len(TOKEN_SLOTS), n, dtype=dtype, device=device) for n in (HIDDEN, INTER)}
    for i, target in enumerate(targets):
        x = xs[target.in_features]
        y_fast = torch.zeros(len(TOKEN_SLOTS), target.out_features, device=device, dtype=dtype)
        y_ref = torch.zeros(len(TOKEN_SLOTS), target.out_features, device=device)
        target.lora.add_delta(x, y_fast, pool.prepare_step(info))
        weights = pool.weights[i]
        weights32 = type(weights)(weights.a.float(), tuple(b.float() for b in weights.bts),
                                  weights.col_starts, weights.rank)
        _add_delta_ref(x.float(), y_ref, weights32, info, pool.scales.float(), dtype)
        _close(y_fast, y_ref, dtype, f"add_delta projection {i}")


def _add_delta_ref(x: torch.Tensor, y: torch.Tensor, weights, info, scales: torch.Tensor,
                   dtype: torch.dtype) -> None:
    """reference.add_delta in float32, with h rounded to `dtype` between shrink and expand:
    the kernels' contract (shrink accumulates in float32 and stores h in the adapter dtype)."""
    from loraplex.server.lora.ops import reference as ref

    rank = weights.rank
    h = ref.sgmv_shrink(x, weights.a, info.seg_starts, info.seg_lens, info.seg_slots)
    h = h.to(dtype).float()                                                 # [T, subs * rank]
    for m, (bt, col_start) in enumerate(zip(weights.bts, weights.col_starts)):
        ref.sgmv_expand(h[:, m * rank:(m + 1) * rank], bt, info.seg_starts, info.seg_lens,
                        info.seg_slots, scales, y, col_start)


# ---- paged attention (server/model/triton_attention.py vs attention.py) ---------------

BLOCK_SIZE, NUM_BLOCKS, KV_HEADS, GROUP, HEAD_DIM = 4, 40, 2, 3, 24   # padded: group 4, dim 32


def _paged_cache(gen: torch.Generator, dtype: torch.dtype, device: str):
    shape = (NUM_BLOCKS, BLOCK_SIZE, KV_HEADS, HEAD_DIM)
    return _randn(gen, *shape, dtype=dtype, device=device), _randn(gen, *shape, dtype=dtype, device=device)


def _block_tables(gen: torch.Generator, context_lens: list[int], device: str) -> torch.Tensor:
    """Disjoint, shuffled physical blocks per sequence, padded with 0 ([N, max_blocks])."""
    needed = [-(-c // BLOCK_SIZE) for c in context_lens]
    ids = torch.randperm(NUM_BLOCKS, generator=gen).tolist()
    rows, used = [], 0
    for n in needed:
        rows.append(ids[used:used + n] + [0] * (max(needed) - n))
        used += n
    return torch.tensor(rows, dtype=torch.int64, device=device)


def case_decode_attention(dtype: torch.dtype, device: str) -> None:
    from loraplex.server.model import attention

    # the twin's name under the registry's naming rule (<op>_ref), or its older name
    decode_attention_ref = getattr(attention, "decode_attention_ref", None) or attention.decode_attention_ref
    from loraplex.server.model import triton_attention

    gen = torch.Generator().manual_seed(3)
    k_cache, v_cache = _paged_cache(gen, dtype, device)
    lens = [1, 9, 30, 4, 17]
    tables = _block_tables(gen, lens, device)
    seq_lens = torch.tensor(lens, dtype=torch.int64, device=device)
    q = _randn(gen, len(lens), KV_HEADS * GROUP, HEAD_DIM, dtype=dtype, device=device)
    for window in (0, 5):
        expected = decode_attention_ref(q.float(), k_cache.float(), v_cache.float(), tables,
                                          seq_lens, 0.2, window)
        actual = triton_attention.decode_attention(q, k_cache, v_cache, tables, seq_lens, 0.2, window)
        _close(actual, expected, dtype, f"decode attention, window {window}")


def _varlen_inputs(dtype: torch.dtype, device: str):
    gen = torch.Generator().manual_seed(5)
    k_cache, v_cache = _paged_cache(gen, dtype, device)
    query_lens, context_lens = [1, 7, 21, 3], [9, 7, 33, 12]   # decode, fresh prefill, 2 tiles, chunk
    tables = _block_tables(gen, context_lens, device)
    starts = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], device=device)
    q = _randn(gen, sum(query_lens), KV_HEADS * GROUP, HEAD_DIM, dtype=dtype, device=device)
    return q, k_cache, v_cache, tables, starts, query_lens, context_lens


def case_varlen_attention(dtype: torch.dtype, device: str) -> None:
    from loraplex.server.model.attention import varlen_attention_ref
    from loraplex.server.model import triton_attention

    q, k_cache, v_cache, tables, starts, query_lens, context_lens = _varlen_inputs(dtype, device)
    seq_lens = torch.tensor(context_lens, dtype=torch.int64, device=device)
    for window in (0, 6):
        expected = varlen_attention_ref(q.float(), k_cache.float(), v_cache.float(), tables, starts,
                                          seq_lens, max(query_lens), 0.2, window)
        actual = triton_attention.varlen_attention(q, k_cache, v_cache, tables, starts, seq_lens,
                                         max(query_lens), 0.2, window)
        _close(actual, expected, dtype, f"varlen attention, window {window}")


def case_paged_attention_plan(dtype: torch.dtype, device: str) -> None:
    """The model's attention entry point with the Triton layer ops vs the per-sequence reference."""
    from loraplex.server.model.attention import paged_attention, paged_attention_ref, plan_attention
    from loraplex.server.model.context import AttentionMetadata
    from loraplex.server.model.fused_ops import triton_layer_ops

    ops = triton_layer_ops()
    q, k_cache, v_cache, tables, starts, query_lens, context_lens = _varlen_inputs(dtype, device)
    decode_only = [i for i, n in enumerate(query_lens) if n == 1]
    for seqs in (list(range(len(query_lens))), decode_only + [2]):   # mixed; a decode then a prefill
        rows = torch.cat([torch.arange(starts[i], starts[i + 1]) for i in seqs]).to(device)
        q_sub = q.index_select(0, rows)
        sub_q_lens = tuple(query_lens[i] for i in seqs)
        sub_ctx = tuple(context_lens[i] for i in seqs)
        sub_starts = torch.tensor([0, *torch.tensor(sub_q_lens).cumsum(0).tolist()], device=device)
        meta = AttentionMetadata(sub_starts, torch.tensor(sub_ctx, device=device),
                                 tables.index_select(0, torch.tensor(seqs, device=device)),
                                 torch.zeros(0, dtype=torch.int64, device=device), sub_q_lens,
                                 sub_ctx, BLOCK_SIZE)
        for window in ((None, 6) if len(seqs) == len(query_lens) else (6,)):
            plan = plan_attention(meta, 0.2, window, dtype, ops.decode_attention, ops.varlen_attention)
            expected = paged_attention_ref(q_sub.float(), k_cache.float(), v_cache.float(), plan)
            _close(paged_attention(q_sub, k_cache, v_cache, plan), expected, dtype,
                   f"paged attention seqs {seqs} window {window}")
    meta = AttentionMetadata(torch.tensor([0, 1, 2], device=device), torch.tensor([9, 12], device=device),
                             tables[[0, 3]], torch.zeros(0, dtype=torch.int64, device=device),
                             (1, 1), (9, 12), BLOCK_SIZE)
    plan = plan_attention(meta, 0.2, None, dtype, ops.decode_attention, ops.varlen_attention)
    q_dec = q[:2]
    _close(paged_attention(q_dec, k_cache, v_cache, plan),
           paged_attention_ref(q_dec.float(), k_cache.float(), v_cache.float(), plan), dtype,
           "paged attention, decode only")


CASES = {name.removeprefix("case_"): fn for name, fn in globals().items() if name.startswith("case_")}


def main(argv: list[str]) -> int:
    """python tests/triton_cases.py CASE DTYPE [DEVICE]: exit 0 when the kernel matches its twin."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))       # lora_helpers
    name, dtype = argv[0], DTYPES[argv[1]]
    device = argv[2] if len(argv) > 2 else "cpu"
    CASES[name](dtype, device)
    print(f"ok: {name} {argv[1]} on {device}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

"""Attention over the paged KV cache for packed ragged batches (prefill chunks and decodes).

`plan_attention` turns the step's AttentionMetadata into index tensors and masks once per step;
every layer then calls `paged_attention` (vectorized, the default) or `paged_attention_ref`
(a per-sequence pure-torch loop, the reference twin) with the same arguments.

Heads are grouped as in HF (`repeat_kv`): query head h reads KV head h // (num_heads // num_kv_heads).
With a sliding window W (Mistral), the query at position p sees keys at positions (p - W, p].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .context import AttentionMetadata

# (q [D, H, hd], k_cache, v_cache, block_tables [D, max_blocks], seq_lens [D], scale, window)
DecodeKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                         float, int], torch.Tensor]
# (q [T, H, hd], k_cache, v_cache, block_tables [N, max_blocks], query_start_loc [N + 1],
#  seq_lens [N], max_query_len, scale, window)
VarlenKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                         torch.Tensor, int, float, int], torch.Tensor]


@dataclass(frozen=True)
class PrefillChunk:
    """One sequence with more than one new token this step."""

    row_start: int                  # first row of its queries in the packed batch
    num_queries: int
    context_len: int                # keys after this step's write
    block_ids: torch.Tensor         # [ceil(context_len / block_size)] int64
    mask: torch.Tensor | None       # [num_queries, context_len] bool, None = plain causal


@dataclass(frozen=True)
class AttentionPlan:
    """Per-step attention layout shared by all layers.

    Decode queries (one new token) run as one padded batch: decode_block_tables
    [num_decodes, max_blocks], decode_lens [num_decodes] int64 (keys per sequence),
    decode_mask [num_decodes, 1, 1, max_blocks * block_size] (0 = attend, -inf = masked; in the
    compute dtype; None when decode_kernel runs them). decode_rows [num_decodes] holds their
    packed rows, None when every row is a decode row (in order). decode_kernel is a fused
    kernel with decode_attention_ref's signature (native.py), or None for the torch path.
    varlen_kernel (varlen_attention_ref's signature, triton_attention.py) is set when the
    batch has a prefill chunk and the layer ops have one: it then runs every row in one launch
    and nothing else of the plan is built.
    """

    meta: AttentionMetadata
    scale: float
    sliding_window: int | None
    decode_rows: torch.Tensor | None
    decode_block_tables: torch.Tensor | None
    decode_mask: torch.Tensor | None
    prefills: tuple[PrefillChunk, ...]
    decode_lens: torch.Tensor | None = None
    decode_kernel: DecodeKernel | None = None
    varlen_kernel: VarlenKernel | None = None

    @property
    def has_decodes(self) -> bool:
        return self.decode_lens is not None


def _causal_mask(num_queries: int, context_len: int, window: int | None,
                 device: torch.device) -> torch.Tensor | None:
    """[q, ctx] bool; query i sits at position ctx - q + i. None when plain is_causal works."""
    offset = context_len - num_queries
    if offset == 0 and (window is None or window >= context_len):
        return None
    q_pos = torch.arange(offset, context_len, device=device).unsqueeze(1)  # [q, 1]
    k_pos = torch.arange(context_len, device=device).unsqueeze(0)          # [1, ctx]
    mask = k_pos <= q_pos
    if window is not None:
        mask &= k_pos > q_pos - window
    return mask


def plan_attention(meta: AttentionMetadata, scale: float, sliding_window: int | None = None,
                   dtype: torch.dtype = torch.float32,
                   decode_kernel: DecodeKernel | None = None,
                   varlen_kernel: VarlenKernel | None = None) -> AttentionPlan:
    """Split the batch into decode rows and prefill chunks; build masks (host work, once a step)."""
    if varlen_kernel is not None and any(q_len > 1 for q_len in meta.query_lens):
        return AttentionPlan(meta, scale, sliding_window, None, None, None, (),
                             varlen_kernel=varlen_kernel)
    device = meta.seq_lens.device
    bs = meta.block_size
    decode_rows: list[int] = []
    decode_seqs: list[int] = []
    prefills = []
    row = 0
    for i, (q_len, ctx) in enumerate(zip(meta.query_lens, meta.context_lens)):
        if q_len == 1:
            decode_rows.append(row)
            decode_seqs.append(i)
        elif q_len > 1:
            blocks = meta.block_tables[i, : -(-ctx // bs)]
            prefills.append(PrefillChunk(row, q_len, ctx, blocks,
                                         _causal_mask(q_len, ctx, sliding_window, device)))
        row += q_len
    rows_t = tables = lens = mask = None
    if decode_rows:
        num_blocks = -(-max(meta.context_lens[i] for i in decode_seqs) // bs)
        tables, lens = meta.block_tables[:, :num_blocks], meta.seq_lens
        if len(decode_rows) != len(meta.query_lens):
            seq_index = torch.tensor(decode_seqs, device=device)
            tables, lens = tables.index_select(0, seq_index), lens.index_select(0, seq_index)
            rows_t = torch.tensor(decode_rows, device=device)
        if decode_kernel is None:
            mask = decode_mask(lens, num_blocks * bs, sliding_window, dtype)
    return AttentionPlan(meta, scale, sliding_window, rows_t, tables, mask, tuple(prefills),
                         lens, decode_kernel)


def decode_mask(lens: torch.Tensor, num_keys: int, sliding_window: int | None,
                dtype: torch.dtype) -> torch.Tensor:
    """lens [D] -> additive mask [D, 1, 1, num_keys]: 0 where key j < lens (within the window),
    else -inf. Float, in the compute dtype: SDPA would otherwise convert a bool mask per layer."""
    k_pos = torch.arange(num_keys, device=lens.device).unsqueeze(0)       # [1, L]
    lens = lens.unsqueeze(1)                                               # [D, 1]
    allowed = k_pos < lens
    if sliding_window is not None:
        allowed &= k_pos >= lens - sliding_window
    mask = torch.zeros(allowed.shape, dtype=dtype, device=lens.device).masked_fill_(~allowed, float("-inf"))
    return mask[:, None, None, :]


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Store new tokens' k, v [T, kv_heads, head_dim] at their slots of the paged cache."""
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, v)


def _gather_context(cache: torch.Tensor, block_ids: torch.Tensor, context_len: int) -> torch.Tensor:
    """[kv_heads, context_len, head_dim] keys (or values) of one sequence."""
    num_kv_heads, head_dim = cache.shape[2], cache.shape[3]
    blocks = cache.index_select(0, block_ids).view(-1, num_kv_heads, head_dim)
    return blocks[:context_len].transpose(0, 1)


# Up to this many keys per decode row, three batched GEMM-sized ops beat the CPU flash kernel,
# whose fixed cost dominates at short contexts (measured ~30% faster at 48 keys, equal near 128).
SHORT_DECODE_KEYS = 96


def _gather_blocks(cache: torch.Tensor, flat_blocks: torch.Tensor) -> torch.Tensor:
    """[num_blocks_total, bs, kv_heads, hd] cache -> [len(flat_blocks) * bs, kv_heads, hd] copy."""
    num_blocks, block_size, num_kv_heads, head_dim = cache.shape
    rows = cache.view(num_blocks, -1).index_select(0, flat_blocks)   # whole blocks, one memcpy each
    return rows.view(-1, num_kv_heads, head_dim)


def _decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      plan: AttentionPlan) -> torch.Tensor:
    """q [D, heads, head_dim] -> [D, heads, head_dim], by the plan's kernel or the torch path."""
    if plan.decode_kernel is not None:
        return plan.decode_kernel(q, k_cache, v_cache, plan.decode_block_tables, plan.decode_lens,
                                  plan.scale, plan.sliding_window or 0)
    return _decode_attention_masked(q, k_cache, v_cache, plan.decode_block_tables,
                                    plan.decode_mask, plan.scale)


def decode_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                           window: int) -> torch.Tensor:
    """Pure-torch twin of the fused decode kernel (native.py), same signature.

    q [D, heads, hd]; caches [blocks, block_size, kv_heads, hd]; block_tables [D, max_blocks];
    seq_lens [D] keys per sequence; window 0 = none. Returns [D, heads, hd].
    """
    num_keys = block_tables.shape[1] * k_cache.shape[1]
    mask = decode_mask(seq_lens, num_keys, window or None, q.dtype)
    return _decode_attention_masked(q, k_cache, v_cache, block_tables, mask, scale)


def _decode_attention_masked(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                             tables: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """q [D, heads, head_dim] -> [D, heads, head_dim]; grouped heads ride the query-length axis."""
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    length = tables.shape[1] * k_cache.shape[1]
    flat = tables.reshape(-1)
    k = _gather_blocks(k_cache, flat).view(num_seqs, length, num_kv_heads, head_dim)
    v = _gather_blocks(v_cache, flat).view(num_seqs, length, num_kv_heads, head_dim)
    if length <= SHORT_DECODE_KEYS:
        batch = num_seqs * num_kv_heads
        k = k.transpose(1, 2).reshape(batch, length, head_dim)                 # [D*KV, L, hd]
        v = v.transpose(1, 2).reshape(batch, length, head_dim)                 # [D*KV, L, hd]
        scores = torch.bmm(q.reshape(batch, group, head_dim), k.transpose(1, 2))  # [D*KV, G, L]
        scores = torch.add(mask.view(num_seqs, 1, length),
                           scores.view(num_seqs, num_heads, length), alpha=scale)
        probs = torch.softmax(scores.view(batch, group, length), dim=-1)
        return torch.bmm(probs, v).view(num_seqs, num_heads, head_dim)
    q = q.reshape(num_seqs, num_kv_heads, group, head_dim)
    out = F.scaled_dot_product_attention(q, k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask, scale=scale)
    return out.view(num_seqs, num_heads, head_dim)      # [D, kv_heads, group, hd] is contiguous


def _prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       chunk: PrefillChunk, scale: float) -> torch.Tensor:
    """q [n, heads, head_dim] of one sequence -> [n, heads, head_dim]."""
    k = _gather_context(k_cache, chunk.block_ids, chunk.context_len).unsqueeze(0)
    v = _gather_context(v_cache, chunk.block_ids, chunk.context_len).unsqueeze(0)
    q = q.transpose(0, 1).unsqueeze(0)                   # [1, heads, n, hd]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=chunk.mask, is_causal=chunk.mask is None,
                                         scale=scale, enable_gqa=True)
    return out[0].transpose(0, 1)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    plan: AttentionPlan) -> torch.Tensor:
    """q [T, heads, head_dim] (packed ragged batch, K/V already written) -> [T, heads, head_dim]."""
    if plan.varlen_kernel is not None:
        meta = plan.meta
        return plan.varlen_kernel(q, k_cache, v_cache, meta.block_tables, meta.query_start_loc,
                                  meta.seq_lens, max(meta.query_lens), plan.scale,
                                  plan.sliding_window or 0)
    if plan.has_decodes and plan.decode_rows is None:
        return _decode_attention(q, k_cache, v_cache, plan)
    out = torch.empty_like(q)
    if plan.has_decodes:
        decoded = _decode_attention(q.index_select(0, plan.decode_rows), k_cache, v_cache, plan)
        out.index_copy_(0, plan.decode_rows, decoded)
    for chunk in plan.prefills:
        rows = slice(chunk.row_start, chunk.row_start + chunk.num_queries)
        out[rows] = _prefill_attention(q[rows], k_cache, v_cache, chunk, plan.scale)
    return out


def paged_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        plan: AttentionPlan) -> torch.Tensor:
    """Reference twin of `paged_attention`: per sequence, float32 softmax(q k^T * scale) v."""
    meta = plan.meta
    num_heads, num_kv_heads = q.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    out = torch.empty_like(q)
    row = 0
    for i, (q_len, ctx) in enumerate(zip(meta.query_lens, meta.context_lens)):
        blocks = meta.block_tables[i, : -(-ctx // meta.block_size)]
        k = k_cache[blocks].flatten(0, 1)[:ctx].repeat_interleave(group, dim=1).float()  # [ctx, H, hd]
        v = v_cache[blocks].flatten(0, 1)[:ctx].repeat_interleave(group, dim=1).float()
        q_i = q[row: row + q_len].float()                                                 # [n, H, hd]
        scores = torch.einsum("qhd,khd->hqk", q_i, k) * plan.scale
        q_pos = torch.arange(ctx - q_len, ctx).unsqueeze(1)
        k_pos = torch.arange(ctx).unsqueeze(0)
        allowed = k_pos <= q_pos
        if plan.sliding_window is not None:
            allowed &= k_pos > q_pos - plan.sliding_window
        scores = scores.masked_fill(~allowed.to(scores.device), float("-inf"))
        out[row: row + q_len] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).to(q.dtype)
        row += q_len
    return out


def varlen_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, query_start_loc: torch.Tensor,
                           seq_lens: torch.Tensor, max_query_len: int, scale: float,
                           window: int) -> torch.Tensor:
    """Pure-torch twin of the Triton varlen kernel (triton_attention.py), same signature.

    q [T, heads, hd] packed; block_tables [N, max_blocks]; query_start_loc [N + 1]; seq_lens
    [N] keys after this step; window 0 = none. Returns [T, heads, hd]. Loops per sequence
    on the host (a reference, not a CUDA path); max_query_len is unused here.
    """
    out = torch.empty_like(q)
    block_size = k_cache.shape[1]
    starts, lens = query_start_loc.tolist(), seq_lens.tolist()
    for i, ctx in enumerate(lens):
        start, end = starts[i], starts[i + 1]
        if end == start:
            continue
        chunk = PrefillChunk(start, end - start, ctx, block_tables[i, : -(-ctx // block_size)],
                             _causal_mask(end - start, ctx, window or None, q.device))
        out[start:end] = _prefill_attention(q[start:end], k_cache, v_cache, chunk, scale)
    return out

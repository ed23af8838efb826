"""Attention with Gemma 2's logit soft-capping over the paged KV cache (packed ragged batches).

Scores are capped before the mask and softmax, `cap * tanh(q k^T * scale / cap)`, as
transformers' eager Gemma 2 attention does; SDPA and the fused kernels have no such step, so
Gemma 2 layers run this (torch, any device). It takes the same plan as `paged_attention` and
honours its sliding window; the softmax runs in float32 like transformers'.
"""

from __future__ import annotations

import torch

from .attention import AttentionPlan


def softcap_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, plan: AttentionPlan,
                      softcap: float) -> torch.Tensor:
    """q [T, heads, hd] (packed, K/V already written) -> [T, heads, hd]."""
    meta = plan.meta
    num_heads, num_kv_heads, head_dim = q.shape[1], k_cache.shape[2], q.shape[2]
    group = num_heads // num_kv_heads
    out = torch.empty_like(q)
    row = 0
    for i, (q_len, ctx) in enumerate(zip(meta.query_lens, meta.context_lens)):
        if q_len == 0:
            continue
        blocks = meta.block_tables[i, : -(-ctx // meta.block_size)]
        k = k_cache.index_select(0, blocks).view(-1, num_kv_heads, head_dim)[:ctx]    # [ctx, KV, hd]
        v = v_cache.index_select(0, blocks).view(-1, num_kv_heads, head_dim)[:ctx]
        q_i = q[row: row + q_len].view(q_len, num_kv_heads, group, head_dim)          # [n, KV, G, hd]
        scores = torch.einsum("qkgd,tkd->kgqt", q_i, k) * plan.scale                   # [KV, G, n, ctx]
        scores = torch.tanh(scores / softcap) * softcap
        scores = scores.masked_fill(~_allowed(q_len, ctx, plan.sliding_window, q.device), float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        out[row: row + q_len] = torch.einsum("kgqt,tkd->qkgd", probs, v).reshape(q_len, num_heads, head_dim)
        row += q_len
    return out


def _allowed(num_queries: int, context_len: int, window: int | None, device: torch.device) -> torch.Tensor:
    """[n, ctx] bool: query i (at position ctx - n + i) sees key j (causal, within the window)."""
    q_pos = torch.arange(context_len - num_queries, context_len, device=device).unsqueeze(1)
    k_pos = torch.arange(context_len, device=device).unsqueeze(0)
    allowed = k_pos <= q_pos
    if window is not None:
        allowed &= k_pos > q_pos - window
    return allowed

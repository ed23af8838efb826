"""Triton attention over the paged KV cache (CUDA): decode and varlen (mixed prefill) kernels.

decode_attention has decode_attention_ref's signature (attention.py, the twin);
varlen_attention has varlen_attention_ref's. Both read K/V block by block through
the block tables, keep an online softmax in float32 and store in q's dtype. Every loop bound
comes from device tensors (seq_lens, query_start_loc) read inside the kernel: launching them
needs no host sync. Imported only when CUDA and triton are present (kernel selection in
fused_ops.layer_ops), and by tests through Triton's interpreter (TRITON_INTERPRET=1).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

NO_WINDOW = 1 << 30        # window 0 (none) becomes "every key" inside the kernels


@triton.jit
def _decode_kernel(q_ptr, k_ptr, v_ptr, out_ptr, tables_ptr, lens_ptr, scale, window,
                   stride_qd, stride_qh, stride_kb, stride_kt, stride_kh,
                   stride_vb, stride_vt, stride_vh, stride_od, stride_oh, stride_tb,
                   GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                   GROUP_PAD: tl.constexpr, DIM_PAD: tl.constexpr, TOKENS_PAD: tl.constexpr):
    """One program = one sequence x one KV head: all GROUP query heads of that KV head."""
    seq = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    seq_len = tl.load(lens_ptr + seq).to(tl.int32)
    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, DIM_PAD)
    offs_t = tl.arange(0, TOKENS_PAD)
    d_mask = offs_d < HEAD_DIM
    heads = kv_head * GROUP + offs_g
    q_mask = (offs_g < GROUP)[:, None] & d_mask[None, :]
    q = tl.load(q_ptr + seq * stride_qd + heads[:, None] * stride_qh + offs_d[None, :],
                mask=q_mask, other=0.0).to(tl.float32) * scale                # [G, D]
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, DIM_PAD], tl.float32)
    first_key = tl.maximum(seq_len - window, 0)
    for b in range(first_key // BLOCK_SIZE, tl.cdiv(seq_len, BLOCK_SIZE)):
        block = tl.load(tables_ptr + seq * stride_tb + b).to(tl.int64)
        pos = b * BLOCK_SIZE + offs_t
        valid = (offs_t < BLOCK_SIZE) & (pos < seq_len) & (pos >= first_key)       # [T]
        kv_mask = valid[:, None] & d_mask[None, :]
        k = tl.load(k_ptr + block * stride_kb + offs_t[:, None] * stride_kt + kv_head * stride_kh
                    + offs_d[None, :], mask=kv_mask, other=0.0).to(tl.float32)   # [T, D]
        s = tl.sum(q[:, None, :] * k[None, :, :], axis=2)                         # [G, T]
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])                                           # [G, T]
        v = tl.load(v_ptr + block * stride_vb + offs_t[:, None] * stride_vt + kv_head * stride_vh
                    + offs_d[None, :], mask=kv_mask, other=0.0).to(tl.float32)   # [T, D]
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(out_ptr + seq * stride_od + heads[:, None] * stride_oh + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=q_mask)


@triton.jit
def _varlen_kernel(q_ptr, k_ptr, v_ptr, out_ptr, tables_ptr, lens_ptr, starts_ptr, scale, window,
                   stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
                   stride_vb, stride_vt, stride_vh, stride_ot, stride_oh, stride_tb,
                   GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                   BLOCK_M: tl.constexpr, DIM_PAD: tl.constexpr, TOKENS_PAD: tl.constexpr,
                   IEEE: tl.constexpr):
    """One program = BLOCK_M query rows of one sequence x one query head (flash-style)."""
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    pid_m = tl.program_id(2)
    q_start = tl.load(starts_ptr + seq).to(tl.int32)
    q_len = tl.load(starts_ptr + seq + 1).to(tl.int32) - q_start
    if pid_m * BLOCK_M < q_len:
        ctx = tl.load(lens_ptr + seq).to(tl.int32)
        kv_head = head // GROUP
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, DIM_PAD)
        offs_t = tl.arange(0, TOKENS_PAD)
        m_mask = offs_m < q_len
        d_mask = offs_d < HEAD_DIM
        rows = (q_start + offs_m).to(tl.int64)
        q_pos = ctx - q_len + offs_m                                              # [M]
        q = tl.load(q_ptr + rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
                    mask=m_mask[:, None] & d_mask[None, :], other=0.0)             # [M, D]
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, DIM_PAD], tl.float32)
        first_key = tl.maximum(ctx - q_len + pid_m * BLOCK_M - window + 1, 0)
        last_key = ctx - q_len + tl.minimum((pid_m + 1) * BLOCK_M, q_len)        # exclusive
        for b in range(first_key // BLOCK_SIZE, tl.cdiv(last_key, BLOCK_SIZE)):
            block = tl.load(tables_ptr + seq * stride_tb + b).to(tl.int64)
            k_pos = b * BLOCK_SIZE + offs_t                                       # [T]
            t_valid = (offs_t < BLOCK_SIZE) & (k_pos < ctx)
            kv_mask = t_valid[:, None] & d_mask[None, :]
            k = tl.load(k_ptr + block * stride_kb + offs_t[:, None] * stride_kt + kv_head * stride_kh
                        + offs_d[None, :], mask=kv_mask, other=0.0)               # [T, D]
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))                                        # [M, T] f32
            s = s * scale
            allowed = (t_valid[None, :] & (k_pos[None, :] <= q_pos[:, None])
                       & (k_pos[None, :] > q_pos[:, None] - window))
            s = tl.where(allowed, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(s - m_safe[:, None])                                       # [M, T]
            v = tl.load(v_ptr + block * stride_vb + offs_t[:, None] * stride_vt + kv_head * stride_vh
                        + offs_d[None, :], mask=kv_mask, other=0.0)               # [T, D]
            l_i = l_i * alpha + tl.sum(p, axis=1)
            if IEEE:
                pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                pv = tl.dot(p.to(v.dtype), v)
            acc = acc * alpha[:, None] + pv
            m_i = m_new
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]     # rows past q_len saw no key
        tl.store(out_ptr + rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


def _check_layouts(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("attention kernels need a contiguous head dim in q and the caches")
    if q.shape[1] % k_cache.shape[2]:
        raise ValueError(f"{q.shape[1]} query heads are not a multiple of {k_cache.shape[2]} KV heads")


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                            window: int) -> torch.Tensor:
    """q [D, heads, hd]; caches [blocks, block_size, kv_heads, hd]; block_tables [D, max_blocks];
    seq_lens [D]; window 0 = none -> [D, heads, hd]. Twin: attention.decode_attention_ref."""
    _check_layouts(q, k_cache, v_cache)
    num_seqs, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    out = torch.empty_like(q)
    if num_seqs == 0:
        return out
    group = num_heads // num_kv_heads
    _decode_kernel[(num_seqs, num_kv_heads)](
        q, k_cache, v_cache, out, block_tables, seq_lens, scale, window or NO_WINDOW,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), out.stride(0), out.stride(1),
        block_tables.stride(0),
        GROUP=group, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        GROUP_PAD=triton.next_power_of_2(group), DIM_PAD=triton.next_power_of_2(head_dim),
        TOKENS_PAD=triton.next_power_of_2(block_size))
    return out


def varlen_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, query_start_loc: torch.Tensor,
                            seq_lens: torch.Tensor, max_query_len: int, scale: float,
                            window: int) -> torch.Tensor:
    """Causal attention for a packed ragged batch (prefill chunks and decodes, K/V written).

    q [T, heads, hd]; block_tables [N, max_blocks]; query_start_loc [N + 1]; seq_lens [N]
    (keys after this step); max_query_len: host int (grid size); window 0 = none.
    Returns [T, heads, hd]. Twin: attention.varlen_attention_ref.
    """
    _check_layouts(q, k_cache, v_cache)
    num_heads, head_dim = q.shape[1], q.shape[2]
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    num_seqs = seq_lens.shape[0]
    out = torch.empty_like(q)
    if num_seqs == 0 or max_query_len == 0:
        return out
    block_m = 16 if max_query_len <= 16 else 32
    grid = (num_seqs, num_heads, triton.cdiv(max_query_len, block_m))
    _varlen_kernel[grid](
        q, k_cache, v_cache, out, block_tables, seq_lens, query_start_loc, scale, window or NO_WINDOW,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), out.stride(0), out.stride(1),
        block_tables.stride(0),
        GROUP=num_heads // num_kv_heads, HEAD_DIM=head_dim, BLOCK_SIZE=block_size, BLOCK_M=block_m,
        DIM_PAD=max(16, triton.next_power_of_2(head_dim)),
        TOKENS_PAD=max(16, triton.next_power_of_2(block_size)), IEEE=q.dtype == torch.float32)
    return out

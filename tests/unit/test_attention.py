"""Paged attention: the vectorized path against the per-sequence reference; KV cache sizing."""

from __future__ import annotations

import pytest
import torch

from error_bounds import assert_within, attention_bound
from loraplex.server.model import attention
from loraplex.server.model.attention import (paged_attention, paged_attention_ref, plan_attention,
                                             write_kv)
from loraplex.server.model.config import ModelConfig, RopeConfig
from loraplex.server.model.context import AttentionMetadata
from loraplex.server.model.kv_cache import (MemoryBudget, allocate_kv_caches, available_memory_bytes,
                                            bytes_per_block, num_blocks_for_budget,
                                            parse_memory_budget)

BLOCK_SIZE = 4
NUM_BLOCKS = 160


def make_meta(query_lens: list[int], context_lens: list[int], gen: torch.Generator) -> AttentionMetadata:
    """Random disjoint block tables; slots for each sequence's last query_len positions."""
    blocks = torch.randperm(NUM_BLOCKS, generator=gen).tolist()
    tables, slots = [], []
    for q_len, ctx in zip(query_lens, context_lens):
        table = [blocks.pop() for _ in range(-(-ctx // BLOCK_SIZE))]
        tables.append(table)
        slots += [table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in range(ctx - q_len, ctx)]
    width = max(len(t) for t in tables)
    starts = [0]
    for q_len in query_lens:
        starts.append(starts[-1] + q_len)
    return AttentionMetadata(
        query_start_loc=torch.tensor(starts), seq_lens=torch.tensor(context_lens),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables]),
        slot_mapping=torch.tensor(slots), query_lens=tuple(query_lens),
        context_lens=tuple(context_lens), block_size=BLOCK_SIZE)


def run_both(query_lens, context_lens, num_heads=4, num_kv_heads=2, head_dim=16, window=None,
             dtype=torch.float32, seed=0):
    """(fast, reference, exact, bound): exact in float64 and the error bound of a computation in
    `dtype` (error_bounds.attention_bound), which fast and reference must each be within."""
    gen = torch.Generator().manual_seed(seed)
    meta = make_meta(query_lens, context_lens, gen)
    shape = (NUM_BLOCKS, BLOCK_SIZE, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(dtype)
    v_cache = torch.randn(shape, generator=gen).to(dtype)
    num_tokens = sum(query_lens)
    q = torch.randn(num_tokens, num_heads, head_dim, generator=gen).to(dtype)
    k = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen).to(dtype)
    v = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen).to(dtype)
    write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
    scale = head_dim ** -0.5
    plan = plan_attention(meta, scale, window, dtype)
    fast, ref = paged_attention(q, k_cache, v_cache, plan), paged_attention_ref(q, k_cache, v_cache, plan)
    exact = exact_attention(q, k_cache, v_cache, meta, scale, window)
    values = exact_attention(q, k_cache, v_cache.abs(), meta, scale, window)
    bound = attention_bound(q, k_cache, scale, max(context_lens), values, stored=dtype)
    return fast, ref, exact, bound


def exact_attention(q, k_cache, v_cache, meta: AttentionMetadata, scale: float, window: int | None):
    """paged_attention_ref's semantics in float64 (the reference itself computes in float32):
    per sequence, causal (and windowed) softmax(q k^T scale) v, GQA heads expanded."""
    group = q.shape[1] // k_cache.shape[2]
    out = torch.empty(q.shape, dtype=torch.float64)
    row = 0
    for i, (q_len, ctx) in enumerate(zip(meta.query_lens, meta.context_lens)):
        blocks = meta.block_tables[i, : -(-ctx // meta.block_size)]
        k = k_cache[blocks].flatten(0, 1)[:ctx].repeat_interleave(group, dim=1).double()   # [ctx, H, hd]
        v = v_cache[blocks].flatten(0, 1)[:ctx].repeat_interleave(group, dim=1).double()
        q_pos, k_pos = torch.arange(ctx - q_len, ctx).unsqueeze(1), torch.arange(ctx).unsqueeze(0)
        allowed = (k_pos <= q_pos) & ((k_pos > q_pos - window) if window is not None else True)
        scores = torch.einsum("qhd,khd->hqk", q[row: row + q_len].double(), k) * scale
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        out[row: row + q_len] = torch.einsum("hqk,khd->qhd", probs, v)
        row += q_len
    return out


def assert_both_within(fast, ref, exact, bound, what: str = "") -> None:
    assert_within(fast, exact, bound, what=f"paged_attention {what}")
    assert_within(ref, exact, bound, what=f"paged_attention_ref {what}")


@pytest.mark.parametrize("query_lens, context_lens", [
    ([1, 1, 1, 1], [1, 7, 13, 30]),                  # decode only, ragged
    ([9, 1, 4, 1], [9, 17, 10, 3]),                  # full prefill, decodes, chunk at offset 6
    ([5, 6], [5, 23]),                               # prefill only, one chunked
    ([1, 3, 1], [4, 3, 25]),                         # prefill in the middle
    ([1, 1, 1], [5, 120, 140]),                      # decode past SHORT_DECODE_KEYS (SDPA route)
    ([1, 2, 1], [97, 2, 3]),                         # long decode beside a short prefill
])
@pytest.mark.parametrize("heads", [(4, 2), (4, 4), (6, 1)])
def test_fast_path_matches_reference(query_lens, context_lens, heads):
    assert_both_within(*run_both(query_lens, context_lens, num_heads=heads[0], num_kv_heads=heads[1]))


@pytest.mark.parametrize("short_keys", [0, 10_000])
def test_decode_routes_agree(monkeypatch, short_keys):
    """The short-context GEMM route and the SDPA route give the reference's answer."""
    monkeypatch.setattr(attention, "SHORT_DECODE_KEYS", short_keys)
    assert_both_within(*run_both([1, 1, 1, 1], [3, 17, 40, 66], num_heads=6, num_kv_heads=2))


@pytest.mark.parametrize("query_lens, context_lens", [([1, 1, 1], [2, 9, 21]), ([7, 1, 6], [7, 12, 20])])
def test_sliding_window_matches_reference(query_lens, context_lens):
    fast, ref, exact, bound = run_both(query_lens, context_lens, window=5)
    assert_both_within(fast, ref, exact, bound, "window 5")
    full = run_both(query_lens, context_lens, window=None)[0]
    assert not torch.allclose(fast, full)            # the window really masks something


def test_bfloat16_matches_reference():
    """bfloat16 inputs, float32 sums (oneDNN, SDPA and the reference all accumulate in float32),
    scores, weights and the output stored in bfloat16: within that computation's bound."""
    fast, ref, exact, bound = run_both([6, 1, 1], [6, 9, 14], dtype=torch.bfloat16)
    assert_both_within(fast, ref, exact, bound, "bfloat16")


def test_both_equal_dense_causal_attention():
    """One sequence prefilled from position 0 equals dense causal attention (GQA expanded)."""
    gen = torch.Generator().manual_seed(3)
    meta = make_meta([8], [8], gen)
    k_cache = torch.zeros(NUM_BLOCKS, BLOCK_SIZE, 1, 16)
    v_cache = torch.zeros(NUM_BLOCKS, BLOCK_SIZE, 1, 16)
    q, k, v = (torch.randn(8, heads, 16, generator=gen) for heads in (2, 1, 1))
    write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
    plan = plan_attention(meta, 0.25)

    def dense(values: torch.Tensor) -> torch.Tensor:                   # float64, [8, 2, 16]
        scores = torch.einsum("qhd,khd->hqk", q.double(), k.double().expand(8, 2, 16)) * 0.25
        scores = scores.masked_fill(torch.ones(8, 8).triu(1).bool(), float("-inf"))
        return torch.einsum("hqk,khd->qhd", scores.softmax(-1), values.double().expand(8, 2, 16))

    bound = attention_bound(q, k_cache, 0.25, 8, dense(v.abs()))
    assert_both_within(paged_attention(q, k_cache, v_cache, plan), paged_attention_ref(q, k_cache, v_cache, plan),
                       dense(v), bound, "vs dense causal attention")


def test_write_kv_stores_at_slots():
    k_cache = torch.zeros(4, 2, 1, 3)
    v_cache = torch.zeros(4, 2, 1, 3)
    k = torch.arange(1.0, 10.0).view(3, 1, 3)
    write_kv(k, -k, k_cache, v_cache, torch.tensor([5, 0, 2]))
    assert torch.equal(k_cache[2, 1, 0], k[0, 0]) and torch.equal(k_cache[0, 0, 0], k[1, 0])
    assert torch.equal(v_cache[1, 0, 0], -k[2, 0])
    assert int((k_cache != 0).any(-1).sum()) == 3    # nothing else was touched


@pytest.mark.parametrize("text, expected", [
    ("2GiB", MemoryBudget(num_bytes=2 * 2**30)), ("512MiB", MemoryBudget(num_bytes=512 * 2**20)),
    ("1.5GB", MemoryBudget(num_bytes=1_500_000_000)), ("1000000", MemoryBudget(num_bytes=1_000_000)),
    ("0.3", MemoryBudget(fraction=0.3)), ("1", MemoryBudget(fraction=1.0)), (0.25, MemoryBudget(fraction=0.25)),
    ("64 mb", MemoryBudget(num_bytes=64_000_000)), ("2G", MemoryBudget(num_bytes=2 * 2**30)),
])
def test_parse_memory_budget(text, expected):
    assert parse_memory_budget(text) == expected


@pytest.mark.parametrize("text", ["", "lots", "2 parsecs", "-1GiB", "0", "1.5", "GiB"])
def test_parse_memory_budget_rejects(text):
    with pytest.raises(ValueError, match="KV cache memory"):
        parse_memory_budget(text)


def _config() -> ModelConfig:
    return ModelConfig(architecture="LlamaForCausalLM", model_type="llama", vocab_size=100,
                       hidden_size=64, intermediate_size=128, num_layers=3, num_heads=4,
                       num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5, max_position_embeddings=64,
                       rope=RopeConfig(theta=10000.0), tie_word_embeddings=True)


def test_kv_cache_sizing_and_allocation():
    config = _config()
    per_block = bytes_per_block(config, 16, torch.float32)
    assert per_block == 2 * 3 * 16 * 2 * 16 * 4
    assert bytes_per_block(config, 16, torch.bfloat16) == per_block // 2
    assert num_blocks_for_budget("1MiB", config, 16, torch.float32) == 2**20 // per_block
    available = available_memory_bytes("cpu")
    assert available > 0
    fraction_blocks = num_blocks_for_budget("0.001", config, 16, torch.float32)
    assert abs(fraction_blocks - int(available * 0.001) // per_block) <= (available // 100) // per_block
    caches = allocate_kv_caches(config, 5, 16, torch.float32)
    assert len(caches) == 3
    assert all(k.shape == (5, 16, 2, 16) and v.shape == k.shape and not k.any() for k, v in caches)

"""BlockManager: all-or-nothing growth, freeing, ownership invariants."""

from __future__ import annotations

import random

import pytest

from loraplex.server.engine.block_manager import BlockManager
from loraplex.server.engine.sequence import SamplingParams, Sequence


def _seq(seq_id: int) -> Sequence:
    return Sequence(seq_id=seq_id, prompt_token_ids=[1, 2, 3], sampling=SamplingParams())


def test_blocks_needed_counts_partial_blocks():
    blocks = BlockManager(num_blocks=10, block_size=4)
    seq = _seq(0)
    assert blocks.blocks_for_tokens(0) == 0
    assert blocks.blocks_for_tokens(1) == 1
    assert blocks.blocks_for_tokens(4) == 1
    assert blocks.blocks_for_tokens(5) == 2
    assert blocks.blocks_needed(seq, 9) == 3
    assert blocks.ensure_capacity(seq, 5)
    assert len(seq.block_table) == 2
    assert blocks.blocks_needed(seq, 8) == 0
    assert blocks.blocks_needed(seq, 9) == 1
    assert blocks.blocks_needed(seq, 3) == 0


def test_ensure_capacity_grows_table_and_is_all_or_nothing():
    blocks = BlockManager(num_blocks=4, block_size=2)
    a, b = _seq(0), _seq(1)
    assert blocks.ensure_capacity(a, 3)                # 2 blocks
    assert blocks.ensure_capacity(a, 4)                # still 2 blocks
    assert blocks.num_free_blocks == 2
    table_before = list(b.block_table)
    assert not blocks.ensure_capacity(b, 7)            # needs 4, only 2 free
    assert b.block_table == table_before
    assert blocks.num_free_blocks == 2
    assert blocks.can_allocate(2) and not blocks.can_allocate(3)
    assert blocks.ensure_capacity(b, 4)
    assert blocks.num_free_blocks == 0
    assert sorted(a.block_table + b.block_table) == [0, 1, 2, 3]
    blocks.check_invariants([a, b])


def test_free_returns_blocks_and_never_double_frees():
    blocks = BlockManager(num_blocks=3, block_size=4)
    a = _seq(0)
    assert blocks.ensure_capacity(a, 12)
    assert blocks.num_free_blocks == 0 and blocks.usage == 1.0
    blocks.free(a)
    assert a.block_table == [] and blocks.num_free_blocks == 3
    blocks.free(a)                                     # table is empty: nothing to free again
    assert blocks.num_free_blocks == 3
    blocks.check_invariants([a])


def test_free_refuses_a_forged_table():
    blocks = BlockManager(num_blocks=3, block_size=4)
    a, b = _seq(0), _seq(1)
    assert blocks.ensure_capacity(a, 4)
    b.block_table.append(a.block_table[0])             # b claims a's block
    with pytest.raises(RuntimeError, match=r"held by \[0\], not by it"):
        blocks.free(b)
    assert blocks.num_free_blocks == 2                 # nothing was freed
    with pytest.raises(AssertionError, match=r"held by sequences \[0, 1\] but recorded as held by \[0\]"):
        blocks.check_invariants([a, b])


def test_check_invariants_detects_a_leak():
    blocks = BlockManager(num_blocks=3, block_size=4)
    a = _seq(0)
    assert blocks.ensure_capacity(a, 8)
    blocks.check_invariants([a])
    with pytest.raises(AssertionError, match=r"held by sequences \[\] but recorded as held by \[0\]"):
        blocks.check_invariants([])                    # a's blocks are owned by nobody listed


def test_rejects_empty_pool():
    with pytest.raises(ValueError, match="num_blocks"):
        BlockManager(num_blocks=0, block_size=16)


def test_random_grow_and_free_keeps_invariants():
    rng = random.Random(7)
    blocks = BlockManager(num_blocks=32, block_size=4)
    seqs = [_seq(i) for i in range(8)]
    lengths = [0] * len(seqs)
    for _ in range(2000):
        i = rng.randrange(len(seqs))
        seq = seqs[i]
        if rng.random() < 0.2:
            blocks.free(seq)
            lengths[i] = 0
        else:
            target = lengths[i] + rng.randint(1, 9)
            free_before = blocks.num_free_blocks
            table_before = list(seq.block_table)
            if blocks.ensure_capacity(seq, target):
                lengths[i] = target
                assert len(seq.block_table) == blocks.blocks_for_tokens(target)
            else:
                assert seq.block_table == table_before and blocks.num_free_blocks == free_before
        blocks.check_invariants(seqs)
        used = sum(len(s.block_table) for s in seqs)
        assert used + blocks.num_free_blocks == blocks.num_blocks

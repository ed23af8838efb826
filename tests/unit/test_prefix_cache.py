"""Prefix caching in the block manager and scheduler (no model).

A fake "KV cache" records, for every slot a step computes, what a real forward would have
written there: (adapter key, position, every token up to and including it). Before each step's
items "attend", every block in their tables must hold exactly the content their own prefix
would have produced, so a block shared under another adapter, another version, another prefix
or with stale content fails the test. Block accounting invariants are checked after every step.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from loraplex.server.engine.batch import RunnerOutput, ScheduledBatch
from loraplex.server.engine.block_manager import BlockManager
from loraplex.server.engine.scheduler import Scheduler, SchedulerConfig
from loraplex.server.engine.sequence import FinishReason, SamplingParams, Sequence, SequenceStatus

SYSTEM = [7, 3, 9, 1, 4, 4, 8, 2, 6, 5, 3, 9]          # 3 full blocks of 4


class FakeKV:
    """What each KV slot would hold: (adapter key, position, tokens[:position + 1])."""

    def __init__(self, num_blocks: int, block_size: int):
        self.block_size = block_size
        self.slots: dict[tuple[int, int], tuple] = {}
        self.num_computed = 0                          # token positions computed (the work done)

    def run(self, batch: ScheduledBatch) -> None:
        bs = self.block_size
        for item in batch.items:                       # a forward writes every K/V first ...
            seq = item.seq
            for pos in range(item.start, item.start + item.num_new_tokens):
                block = seq.block_table[pos // bs]
                self.slots[(block, pos % bs)] = (seq.adapter_key, pos, tuple(seq.all_token_ids[: pos + 1]))
            self.num_computed += item.num_new_tokens
        for item in batch.items:                       # ... then attention reads the context
            seq = item.seq
            tokens = seq.all_token_ids
            for pos in range(item.start + item.num_new_tokens):
                block = seq.block_table[pos // bs]
                want = (seq.adapter_key, pos, tuple(tokens[: pos + 1]))
                assert self.slots.get((block, pos % bs)) == want, (
                    f"sequence {seq.seq_id} reads wrong K/V at position {pos} (block {block})")


def make(num_blocks=64, block_size=4, caching=True, **cfg) -> Scheduler:
    cfg = {"max_num_seqs": 8, "max_batch_tokens": 64, **cfg}
    return Scheduler(SchedulerConfig(**cfg), BlockManager(num_blocks, block_size, enable_caching=caching))


def seq(seq_id: int, prompt: list[int], adapter: str | None = None, max_new: int = 3) -> Sequence:
    return Sequence(seq_id=seq_id, prompt_token_ids=list(prompt), adapter_key=adapter,
                    sampling=SamplingParams(max_new_tokens=max_new, ignore_eos=True))


def token_for(s: Sequence) -> int:
    """The 'model': the next token depends on the adapter and the whole context."""
    return 100 + hash((s.adapter_key, tuple(s.all_token_ids))) % 900


def step(sched: Scheduler, kv: FakeKV) -> ScheduledBatch:
    batch = sched.schedule()
    kv.run(batch)
    sampled = {item.seq.seq_id: token_for(item.seq) for item in batch.sampled_items}
    sched.update(batch, RunnerOutput(sampled))
    sched.check_invariants()
    return batch


def drain(sched: Scheduler, kv: FakeKV) -> None:
    for _ in range(10_000):
        if not sched.has_unfinished:
            return
        step(sched, kv)
    raise AssertionError("no progress")


def run_alone(sched: Scheduler, kv: FakeKV, s: Sequence) -> Sequence:
    sched.add(s)
    drain(sched, kv)
    return s


# ---- isolation: written first --------------------------------------------------------------
def test_a_prefix_cached_under_one_adapter_is_not_reused_by_another_or_a_new_version():
    sched = make()
    kv = FakeKV(64, 4)
    prompt = SYSTEM + [11, 12]
    first = run_alone(sched, kv, seq(0, prompt, adapter="a@1"))
    assert first.num_cached_tokens == 0
    for i, other in enumerate(["b@1", "a@2", None], start=1):   # another adapter, version, the base
        s = run_alone(sched, kv, seq(i, prompt, adapter=other))
        assert s.num_cached_tokens == 0, other
    again = run_alone(sched, kv, seq(9, prompt, adapter="a@1"))
    assert again.num_cached_tokens == len(SYSTEM)                  # its own version hits
    assert again.output_token_ids == first.output_token_ids
    base_again = run_alone(sched, kv, seq(10, prompt, adapter=None))
    assert base_again.num_cached_tokens == len(SYSTEM)


def test_no_sharing_with_the_cache_off():
    sched = make(caching=False)
    kv = FakeKV(64, 4)
    run_alone(sched, kv, seq(0, SYSTEM + [1]))
    again = run_alone(sched, kv, seq(1, SYSTEM + [1]))
    assert again.num_cached_tokens == 0 and sched.blocks.num_cached_blocks == 0


# ---- what is shared ------------------------------------------------------------------------
def test_only_full_blocks_of_all_but_the_last_token_are_reused():
    sched = make()
    kv = FakeKV(64, 4)
    run_alone(sched, kv, seq(0, SYSTEM + [20, 21], max_new=1))
    exact = run_alone(sched, kv, seq(1, SYSTEM, max_new=1))          # 12 tokens = 3 full blocks
    assert exact.num_cached_tokens == 8                              # the last token is recomputed
    partial = run_alone(sched, kv, seq(2, SYSTEM[:10], max_new=1))   # 2 full blocks + a partial one
    assert partial.num_cached_tokens == 8
    diverge = run_alone(sched, kv, seq(3, SYSTEM[:4] + [99] + SYSTEM[5:], max_new=1))
    assert diverge.num_cached_tokens == 4                           # the chain breaks at block 1


def test_hits_skip_prefill_work_and_generated_blocks_are_cached_too():
    sched = make()
    kv = FakeKV(64, 4)
    first = run_alone(sched, kv, seq(0, SYSTEM + [30], max_new=8))
    before = kv.num_computed
    turn2 = SYSTEM + [30] + first.output_token_ids + [31, 32]       # the next turn resends it all
    second = run_alone(sched, kv, seq(1, turn2, max_new=2))
    assert second.num_cached_tokens == 20                           # 5 full blocks incl. generated ones
    assert kv.num_computed - before == len(turn2) - 20 + 1          # the rest + 1 decode


def test_same_step_siblings_share_the_prompt_blocks():
    """n > 1: the samples arrive together; the first prefills, the rest reuse its blocks in the
    same forward (K/V are written for the whole batch before attention reads them)."""
    sched = make()
    kv = FakeKV(64, 4)
    prompt = SYSTEM + [40, 41, 42]
    siblings = [seq(i, prompt, adapter="a@1", max_new=4) for i in range(4)]
    for s in siblings:
        sched.add(s)
    batch = step(sched, kv)
    assert [(i.start, i.num_new_tokens) for i in batch.items] == [(0, 15), (12, 3), (12, 3), (12, 3)]
    shared = siblings[0].block_table[:3]
    assert all(s.block_table[:3] == shared for s in siblings)
    assert len({s.block_table[3] for s in siblings}) == 4           # partial blocks are private
    drain(sched, kv)
    assert [s.num_cached_tokens for s in siblings] == [0, 12, 12, 12]


def test_unheld_cached_blocks_count_as_free_and_are_evicted_lru_only_when_needed():
    sched = make(num_blocks=8, block_size=4, max_model_len=32)
    kv = FakeKV(8, 4)
    old = run_alone(sched, kv, seq(0, [1] * 12, max_new=1))          # caches 3 blocks (1 partial freed)
    new = run_alone(sched, kv, seq(1, [2] * 12, max_new=1))
    blocks = sched.blocks
    assert blocks.num_free_blocks == 8 and blocks.num_cached_blocks == 6 and blocks.stats.evicted_blocks == 0
    touch = run_alone(sched, kv, seq(2, [1] * 12, max_new=1))        # old prefix used again: now newer
    assert touch.num_cached_tokens == 8
    big = run_alone(sched, kv, seq(3, [3] * 24, max_new=1))          # 6 blocks: 2 free + 4 evicted
    assert blocks.stats.evicted_blocks == 4
    assert run_alone(sched, kv, seq(4, [1] * 12, max_new=1)).num_cached_tokens == 8   # recently used: kept
    assert run_alone(sched, kv, seq(5, [2] * 12, max_new=1)).num_cached_tokens == 0   # LRU went first
    assert big.output_token_ids and old.output_token_ids and new.output_token_ids


def test_cached_blocks_never_block_admission():
    sched = make(num_blocks=6, block_size=4, max_model_len=24)
    kv = FakeKV(6, 4)
    for i in range(5):
        run_alone(sched, kv, seq(i, [i + 1] * 9, max_new=1))
    assert sched.blocks.num_cached_blocks > 0
    assert run_alone(sched, kv, seq(9, [50] * 20, max_new=3)).is_finished   # 6 blocks: all of them


def test_deleted_adapter_blocks_are_dropped_and_reset_forgets_everything():
    sched = make()
    kv = FakeKV(64, 4)
    run_alone(sched, kv, seq(0, SYSTEM + [1], adapter="a@1"))
    run_alone(sched, kv, seq(1, SYSTEM + [1], adapter="b@1"))
    blocks = sched.blocks
    assert blocks.num_cached_blocks == 6
    assert blocks.drop_adapter("a@1") == 3 and blocks.num_cached_blocks == 3
    assert run_alone(sched, kv, seq(2, SYSTEM + [1], adapter="b@1")).num_cached_tokens == 12
    holder = seq(3, SYSTEM + [1], adapter="b@1", max_new=5)
    sched.add(holder)
    step(sched, kv)                                                  # holds the cached blocks
    assert blocks.reset() == 3 and blocks.num_cached_blocks == 0
    sched.check_invariants()
    drain(sched, kv)
    assert run_alone(sched, kv, seq(4, SYSTEM + [1], adapter="b@1")).num_cached_tokens == 0
    assert blocks.num_free_blocks == blocks.num_blocks


def test_a_failed_step_uncaches_what_it_wrote():
    sched = make()
    kv = FakeKV(64, 4)
    s = seq(0, SYSTEM + [5])
    sched.add(s)
    batch = sched.schedule()
    sched.update(batch, RunnerOutput({}, failed_seq_ids=frozenset({0})))
    assert s.finish_reason is FinishReason.ERROR
    assert sched.blocks.num_cached_blocks == 0
    sched.check_invariants()
    assert run_alone(sched, kv, seq(1, SYSTEM + [5])).num_cached_tokens == 0


def test_preempted_sequence_recomputes_only_what_is_not_cached():
    sched = make(num_blocks=7, block_size=4, max_model_len=28)
    kv = FakeKV(7, 4)
    a = seq(0, SYSTEM + [1], max_new=12)
    b = seq(1, [9] * 9, max_new=12)
    sched.add(a)
    sched.add(b)
    preempted = []
    for _ in range(200):
        if not sched.has_unfinished:
            break
        preempted += step(sched, kv).preempted
    assert preempted, "the pool was meant to force a preemption"
    assert a.is_finished and b.is_finished
    assert a.output_token_ids and b.output_token_ids


# ---- randomized stress ---------------------------------------------------------------------
PROMPTS = [SYSTEM, SYSTEM[:8] + [5, 5, 5, 5], [3] * 8, [1, 2, 3, 4, 5, 6, 7]]


@st.composite
def scenarios(draw):
    num_blocks = draw(st.integers(6, 24))
    ops = draw(st.lists(st.tuples(st.sampled_from(["add", "add", "add", "step", "step", "step",
                                                   "cancel", "reset", "drop"]),
                                  st.integers(0, 3), st.sampled_from([None, "a@1", "a@2", "b@1"]),
                                  st.integers(0, 6), st.integers(1, 6)),
                        min_size=5, max_size=60))
    return num_blocks, ops


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_random_admit_cancel_preempt_evict_keeps_invariants_and_content(scenario):
    """Random arrivals (prompts sharing prefixes across and within adapters), steps, cancels,
    cache resets and adapter drops on a small pool (so preemption and eviction happen): after
    every operation the accounting holds, and every block a step reads holds its own content."""
    num_blocks, ops = scenario
    sched = make(num_blocks=num_blocks, block_size=4, max_model_len=4 * num_blocks, max_num_seqs=4,
                 max_batch_tokens=16)
    kv = FakeKV(num_blocks, 4)
    rng = random.Random(len(ops))
    live: list[Sequence] = []
    next_id = 0
    for op, prompt_index, adapter, extra, max_new in ops:
        if op == "add" and not sched.queue_full:
            prompt = PROMPTS[prompt_index] + [200 + extra] * (extra % 3)
            if len(prompt) + max_new <= 4 * num_blocks:
                s = seq(next_id, prompt, adapter=adapter, max_new=max_new)
                sched.add(s)
                live.append(s)
                next_id += 1
        elif op == "step":
            for _ in range(extra + 1):
                step(sched, kv)
        elif op == "cancel" and live:
            sched.abort(rng.choice(live).seq_id)
        elif op == "reset":
            sched.blocks.reset()
        elif op == "drop" and adapter is not None:
            sched.blocks.drop_adapter(adapter)
        sched.check_invariants()
    drain(sched, kv)
    assert sched.blocks.num_free_blocks == num_blocks
    for s in live:
        assert s.is_finished
        if s.finish_reason is not FinishReason.ABORT:
            assert len(s.output_token_ids) == s.sampling.max_new_tokens
            assert s.status is SequenceStatus.FINISHED

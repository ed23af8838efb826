"""Iteration-level continuous batching over the paged KV cache (vLLM-v1 computed-token model)."""

from __future__ import annotations

import bisect
import heapq
import time
from collections import Counter
from collections.abc import Callable

from .config import SchedulerConfig
from .batch import RunnerOutput, ScheduledBatch, ScheduledSeq
from .block_manager import BlockManager
from .sequence import FinishReason, Sequence, SequenceStatus
from .waiting_queue import WaitingQueues

AdapterReady = Callable[[str], bool]


class Scheduler:
    """Decides, every step, which sequences run and how many tokens each computes.

    Step order: running sequences first (oldest arrival first; decodes take 1 token, prefills
    take what is left of `max_batch_tokens` after reserving 1 token for every decode), then
    waiting sequences are admitted oldest-first while the token budget, `max_num_seqs`, free
    blocks (keeping `watermark_blocks` in reserve) and `max_loras` allow. No admission happens
    in a step that preempted. A running sequence that cannot get a block preempts (recompute
    mode) the most recently arrived running sequence, possibly itself.

    Waiting sequences sit in one FIFO per adapter key; admission walks the queue heads in
    arrival order (a heap), so one step costs O(adapters waiting + running + admitted).

    Admission rule (exact):
    1. A sequence whose adapter is not ready (`adapter_ready(key)` is False) is skipped along
       with its whole adapter queue; it blocks nobody, keeps its arrival rank, and is first
       in line once ready (`pending_adapter_keys` lists its adapter first for prefetch).
    2. The first ready sequence B that does not fit (adapter limit, or free blocks minus
       watermark) becomes the step's *blocked* sequence. Within one adapter queue nobody
       overtakes an older sequence.
    3. After B, a later sequence may still be admitted only if its adapter is None or already
       held by a running sequence (so the adapter set does not grow) and it fits; each such
       admission spends one of B's `max_overtakes` (kept across steps until B is admitted).
       Once B's allowance is spent, admission stops behind B until B fits: the running set
       drains and `add` guarantees B fits into an idle cache. So a blocked sequence lets at
       most `max_overtakes` later arrivals pass it (sequences behind it wait for finitely many
       older ones, each with the same bound), and a burst for one adapter cannot starve another.

    Prefix caching (BlockManager.enable_caching) changes only what a sequence costs: at
    admission it takes the cached blocks of its longest cached prefix (same adapter version)
    as already computed, so its token budget and block need count only the rest; cached
    blocks nobody holds count as free. The rule above and its fairness bound are unchanged.
    """

    def __init__(self, config: SchedulerConfig, blocks: BlockManager,
                 clock: Callable[[], float] = time.monotonic):
        if config.watermark_blocks >= blocks.num_blocks:
            raise ValueError(f"watermark_blocks ({config.watermark_blocks}) must be below the number "
                             f"of KV blocks ({blocks.num_blocks})")
        self.config = config
        self.blocks = blocks
        self.clock = clock
        self.total_preemptions = 0
        self._seqs: dict[int, Sequence] = {}          # every unfinished sequence
        self._rank: dict[int, int] = {}               # seq_id -> arrival rank (add order)
        self._next_rank = 0
        self._running: list[Sequence] = []            # sorted by arrival rank
        self._running_adapters: Counter[str] = Counter()
        self._waiting = WaitingQueues(self._order)
        self._overtakes_left: dict[int, int] = {}     # blocked seq_id -> allowance left

    # ---- queries -----------------------------------------------------------------------
    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def queue_full(self) -> bool:
        """True when `max_queued_requests` sequences wait: new requests are refused."""
        return len(self._waiting) >= self.config.max_queued_requests

    @property
    def has_unfinished(self) -> bool:
        return bool(self._seqs)

    def get(self, seq_id: int) -> Sequence | None:
        return self._seqs.get(seq_id)

    def unfinished(self) -> list[Sequence]:
        return list(self._seqs.values())

    @property
    def running_adapter_keys(self) -> tuple[str, ...]:
        """Adapter keys of the running sequences, sorted (at most max_loras of them)."""
        return tuple(sorted(self._running_adapters))

    def pending_adapter_keys(self) -> list[str]:
        """Adapters of waiting sequences, oldest waiting request first (for prefetch)."""
        return [key for _, key in sorted(self._waiting.heads()) if key is not None]

    def _order(self, seq: Sequence) -> int:
        return self._rank[seq.seq_id]

    # ---- intake and removal ------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        """Queue a new sequence. Raises ValueError when it could never fit the KV cache.

        Requests are validated before (engine/validation.py: lengths against max_model_len);
        the engine refuses new requests while `queue_full`.
        """
        if seq.seq_id in self._seqs:
            raise ValueError(f"sequence {seq.seq_id} was already added")
        if seq.status is not SequenceStatus.WAITING or seq.num_computed_tokens or seq.block_table:
            raise ValueError(f"sequence {seq.seq_id} is not new (status {seq.status.value})")
        self._check_fits(seq)
        self._rank[seq.seq_id] = self._next_rank
        self._next_rank += 1
        self._seqs[seq.seq_id] = seq
        self._waiting.push(seq)

    def _check_fits(self, seq: Sequence) -> None:
        cfg, blocks = self.config, self.blocks
        total = seq.num_prompt_tokens + seq.sampling.max_new_tokens
        what = f"prompt ({seq.num_prompt_tokens}) + max_new_tokens ({seq.sampling.max_new_tokens})"
        fix = "lower max_new_tokens or shorten the prompt"
        if seq.num_prompt_tokens < 1:
            raise ValueError("the prompt is empty")
        need = blocks.blocks_for_tokens(total)
        if need > blocks.num_blocks:
            raise ValueError(f"{what} needs {need} KV blocks of {blocks.block_size} tokens but the cache "
                             f"has {blocks.num_blocks}; {fix}")
        first = blocks.blocks_for_tokens(min(total, cfg.max_batch_tokens))
        if first + cfg.watermark_blocks > blocks.num_blocks:
            raise ValueError(f"the first prefill chunk needs {first} KV blocks, but only "
                             f"{blocks.num_blocks - cfg.watermark_blocks} can be admitted (the cache has "
                             f"{blocks.num_blocks}, watermark {cfg.watermark_blocks}); {fix}")

    def abort(self, seq_id: int) -> Sequence | None:
        """Finish an unfinished sequence with ABORT, freeing its blocks now; None if unknown."""
        seq = self._seqs.get(seq_id)
        if seq is not None:
            self.finish(seq, FinishReason.ABORT)
        return seq

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """Finish `seq` (running or waiting) now: free its blocks, drop it from every queue."""
        if seq.is_finished:
            return
        if seq.status is SequenceStatus.RUNNING:
            self._remove_running(seq)
        else:
            self._waiting.remove(seq)
        self.blocks.free(seq, uncache=reason is FinishReason.ERROR)   # K/V of a failed step: unknown
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        self._seqs.pop(seq.seq_id, None)
        self._rank.pop(seq.seq_id, None)
        self._overtakes_left.pop(seq.seq_id, None)

    # ---- scheduling --------------------------------------------------------------------
    def schedule(self, adapter_ready: AdapterReady = lambda key: True) -> ScheduledBatch:
        """Pick this step's sequences and token counts; allocate their KV blocks."""
        items: list[ScheduledSeq] = []
        preempted: list[Sequence] = []
        budget = self._schedule_running(items, preempted)
        if not preempted:
            self._admit_waiting(items, budget, adapter_ready)
        now = self.clock()
        for item in items:
            if item.seq.first_scheduled_time is None:
                item.seq.first_scheduled_time = now
        return ScheduledBatch(items=tuple(items), preempted=tuple(preempted))

    def _schedule_running(self, items: list[ScheduledSeq], preempted: list[Sequence]) -> int:
        budget = self.config.max_batch_tokens
        running = self._running
        decodes_left = sum(1 for seq in running if seq.num_uncomputed_tokens == 1)
        i = 0
        while i < len(running):
            seq = running[i]
            if seq.num_uncomputed_tokens == 1:
                decodes_left -= 1
                n = 1
            else:
                n = min(seq.num_uncomputed_tokens, budget - decodes_left)
                if n <= 0:
                    i += 1
                    continue
            while not self.blocks.ensure_capacity(seq, seq.num_computed_tokens + n):
                victim = running[-1]                  # the most recently arrived
                if victim is not seq and victim.num_uncomputed_tokens == 1:
                    decodes_left -= 1
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    return budget
            self.blocks.register(seq, seq.num_computed_tokens + n)
            items.append(_item(seq, n))
            budget -= n
            i += 1
        return budget

    def _preempt(self, seq: Sequence) -> None:
        self._remove_running(seq)
        self.blocks.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.total_preemptions += 1
        self._waiting.push(seq)

    def _admit_waiting(self, items: list[ScheduledSeq], budget: int, adapter_ready: AdapterReady) -> None:
        heads = self._waiting.heads()
        heapq.heapify(heads)
        blocked: Sequence | None = None
        while heads and budget > 0 and len(self._running) < self.config.max_num_seqs:
            _, key = heapq.heappop(heads)
            if blocked is not None and self._overtakes_left[blocked.seq_id] <= 0:
                break
            if key is not None and not adapter_ready(key):
                continue
            if blocked is not None and key is not None and key not in self._running_adapters:
                continue
            seq = self._waiting.head(key)
            hits = self.blocks.lookup(seq)
            n = min(seq.num_uncomputed_tokens - len(hits) * self.blocks.block_size, budget)
            if not self._fits(seq, hits, n):
                if blocked is None:
                    blocked = seq
                    self._overtakes_left.setdefault(seq.seq_id, self.config.max_overtakes)
                continue
            self._waiting.pop_head(key)
            self._admit(seq, hits, n)
            items.append(_item(seq, n))
            budget -= n
            if blocked is not None:
                self._overtakes_left[blocked.seq_id] -= 1
            if self._waiting.has(key):
                heapq.heappush(heads, (self._order(self._waiting.head(key)), key))

    def _fits(self, seq: Sequence, hits: list[int], num_new_tokens: int) -> bool:
        """Adapter limit and free blocks for a waiting `seq` that reuses the cached `hits`."""
        key = seq.adapter_key
        if (key is not None and key not in self._running_adapters
                and len(self._running_adapters) >= self.config.max_loras):
            return False
        blocks = self.blocks
        need = blocks.blocks_for_tokens(len(hits) * blocks.block_size + num_new_tokens) - len(hits)
        available = blocks.num_free_blocks - blocks.num_reclaimable_in(hits)
        return available - need >= self.config.watermark_blocks

    def _admit(self, seq: Sequence, hits: list[int], num_new_tokens: int) -> None:
        first = seq.first_scheduled_time is None
        self.blocks.take_prefix(seq, hits)
        if first:
            seq.num_cached_tokens = seq.num_computed_tokens
        end = seq.num_computed_tokens + num_new_tokens
        if not self.blocks.ensure_capacity(seq, end):
            raise RuntimeError(f"sequence {seq.seq_id} was admitted without free blocks")
        self.blocks.register(seq, end)
        bisect.insort(self._running, seq, key=self._order)
        if seq.adapter_key is not None:
            self._running_adapters[seq.adapter_key] += 1
        seq.status = SequenceStatus.RUNNING
        self._overtakes_left.pop(seq.seq_id, None)

    def _remove_running(self, seq: Sequence) -> None:
        self._running.remove(seq)
        key = seq.adapter_key
        if key is not None:
            self._running_adapters[key] -= 1
            if not self._running_adapters[key]:
                del self._running_adapters[key]

    # ---- results -----------------------------------------------------------------------
    def update(self, batch: ScheduledBatch, output: RunnerOutput) -> list[Sequence]:
        """Apply one forward pass's results; return the sequences that finished in it."""
        tokens, logprobs, failed = output.sampled_token_ids, output.logprobs, output.failed_seq_ids
        alternatives = output.top_logprobs
        missing = [item.seq.seq_id for item in batch.items
                   if item.sample and item.seq.seq_id not in tokens and item.seq.seq_id not in failed]
        if missing:
            raise ValueError(f"the runner returned no token for sampled sequences {missing}")
        finished: list[Sequence] = []
        now = self.clock()
        for item in batch.items:
            seq = item.seq
            if seq.is_finished:
                continue
            if seq.seq_id in failed:
                self.finish(seq, FinishReason.ERROR)
                finished.append(seq)
                continue
            if seq.num_computed_tokens != item.start:
                raise RuntimeError(f"sequence {seq.seq_id} changed between schedule and update "
                                   f"(computed {seq.num_computed_tokens}, scheduled from {item.start})")
            seq.num_computed_tokens += item.num_new_tokens
            if not item.sample:
                continue
            token = tokens[seq.seq_id]
            seq.output_token_ids.append(token)
            logprob = logprobs.get(seq.seq_id) if logprobs is not None else None
            if logprob is not None:
                seq.output_logprobs.append(logprob)
            if alternatives is not None and seq.sampling.top_logprobs and seq.seq_id in alternatives:
                seq.output_top_logprobs.append(alternatives[seq.seq_id])
            if seq.first_token_time is None:
                seq.first_token_time = now
            reason = self._stop_reason(seq, token)
            if reason is not None:
                self.finish(seq, reason)
                finished.append(seq)
        for seq_id in failed:
            seq = self._seqs.get(seq_id)
            if seq is not None:
                self.finish(seq, FinishReason.ERROR)
                finished.append(seq)
        return finished

    def _stop_reason(self, seq: Sequence, token: int) -> FinishReason | None:
        if token in seq.eos_token_ids and not seq.sampling.ignore_eos:
            return FinishReason.EOS
        if token in seq.sampling.stop_token_ids:
            return FinishReason.STOP
        if (seq.num_output_tokens >= seq.sampling.max_new_tokens
                or seq.num_tokens >= self.config.max_model_len):
            return FinishReason.LENGTH
        return None

    # ---- checking ----------------------------------------------------------------------
    def check_invariants(self) -> None:
        """Raise AssertionError if queues, budgets or block ownership are inconsistent (tests)."""
        seqs = list(self._seqs.values())
        self.blocks.check_invariants(seqs)
        running, waiting = self._running, list(self._waiting)
        _expect(len(running) + len(waiting) == len(seqs), "a sequence is lost or queued twice")
        _expect(len(running) <= self.config.max_num_seqs, "too many running sequences")
        _expect(len(self._running_adapters) <= self.config.max_loras, "too many running adapters")
        _expect(all(s.status is SequenceStatus.RUNNING for s in running), "a running seq is not RUNNING")
        bs = self.blocks.block_size
        _expect(all(len(s.block_table) * bs >= s.num_computed_tokens for s in running),
                "a running sequence lacks blocks for its computed tokens")
        _expect(all(s.status is SequenceStatus.WAITING and not s.block_table
                    and s.num_computed_tokens == 0 for s in waiting), "a waiting sequence holds state")


def _item(seq: Sequence, num_new_tokens: int) -> ScheduledSeq:
    start = seq.num_computed_tokens
    return ScheduledSeq(seq=seq, start=start, num_new_tokens=num_new_tokens,
                        sample=start + num_new_tokens == seq.num_tokens)


def _expect(ok: bool, message: str) -> None:
    if not ok:
        raise AssertionError(message)

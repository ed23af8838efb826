"""Typed step objects passed scheduler -> runner -> scheduler."""

from __future__ import annotations

from dataclasses import dataclass, field

from .sequence import Sequence


@dataclass(frozen=True)
class ScheduledSeq:
    """One sequence's share of a step.

    The runner computes tokens `seq.all_token_ids[start : start + num_new_tokens]` at
    positions `start ..`, where `start == seq.num_computed_tokens` at schedule time, and
    writes their K/V into `seq.block_table`. When `sample` is true (the chunk reaches the
    last known token) the runner samples one next token for this sequence.
    """

    seq: Sequence
    start: int
    num_new_tokens: int
    sample: bool


@dataclass(frozen=True)
class ScheduledBatch:
    """Everything one forward pass needs to know about which sequences run."""

    items: tuple[ScheduledSeq, ...]
    preempted: tuple[Sequence, ...] = ()   # sequences that lost their blocks this step

    @property
    def num_tokens(self) -> int:
        return sum(item.num_new_tokens for item in self.items)

    @property
    def num_seqs(self) -> int:
        return len(self.items)

    @property
    def is_empty(self) -> bool:
        return not self.items

    @property
    def sampled_items(self) -> list[ScheduledSeq]:
        return [item for item in self.items if item.sample]

    @property
    def adapter_keys(self) -> set[str]:
        return {item.seq.adapter_key for item in self.items if item.seq.adapter_key}


@dataclass(frozen=True)
class RunnerOutput:
    """Result of one forward pass, keyed by sequence id (batch order never matters).

    sampled_token_ids: seq_id -> the token sampled for each item with sample=True.
    logprobs:          seq_id -> its logprob, or None when no sequence asked for logprobs.
    failed_seq_ids:    sequences whose forward pass failed; they have no token and are
                       finished with FinishReason.ERROR by the scheduler.
    top_logprobs:      seq_id -> its top alternatives ((token id, logprob), best first), or
                       None when no sequence asked for top_logprobs.
    """

    sampled_token_ids: dict[int, int]
    logprobs: dict[int, float] | None = None
    failed_seq_ids: frozenset[int] = field(default_factory=frozenset)
    top_logprobs: dict[int, tuple[tuple[int, float], ...]] | None = None

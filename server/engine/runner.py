"""ModelRunner: one ScheduledBatch -> one forward pass over the paged KV cache -> sampled tokens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch

from ..lora.batch_info import LoraBatchInfo
from ..lora.delta import LoraStep
from ..model.config import ModelConfig
from ..model.context import AttentionMetadata, ForwardContext
from .batch import RunnerOutput, ScheduledBatch
from .sequence import Sequence

Sampler = Callable[[torch.Tensor, list[Sequence]], Any]   # -> SampleResult(token_ids, logprobs)


@dataclass(frozen=True)
class StepInputs:
    """Device tensors for one forward pass plus the rows whose logits are sampled."""

    input_ids: torch.Tensor       # [T] int64
    ctx: ForwardContext
    sample_rows: torch.Tensor     # [n] int64, last row of each sampling item
    sample_seqs: list[Sequence]


class LoraStepSource(Protocol):
    """Prepares a step's LoRA routing for the ops (the SlotPool)."""

    def prepare_step(self, info: LoraBatchInfo) -> LoraStep: ...


class ModelRunner:
    """Builds the step's inputs from a ScheduledBatch, runs the model, samples.

    The batch runs in the scheduler's order; the LoRA metadata (LoraBatchInfo: per-token
    slots, their runs and the active slots) tells the delta kernels which rows share an
    adapter, and `lora.prepare_step` turns it into the step's routing once, before the
    forward, handed down in the ForwardContext. Output is keyed by sequence id.

    kv_caches: per layer (K, V), each [num_blocks, block_size, num_kv_heads, head_dim].
    sampler(logits [n, vocab] float32, seqs) -> SampleResult with token_ids and logprobs.
    lora: the slot pool, or None for a server without adapters.
    """

    def __init__(self, model, config: ModelConfig, kv_caches, block_size: int, sampler: Sampler,
                 device: str = "cpu", lora: LoraStepSource | None = None):
        self.model = model
        self.config = config
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.sampler = sampler
        self.device = torch.device(device)
        self.vocab_size = config.vocab_size
        self.lora = lora

    def run(self, batch: ScheduledBatch, adapter_slots: dict[str, int] | None = None) -> RunnerOutput:
        """One forward pass; a token (and logprob) for every item with sample=True, by seq id."""
        if batch.is_empty:
            return RunnerOutput(sampled_token_ids={})
        inputs = self.prepare(batch, adapter_slots)
        with torch.inference_mode():
            hidden = self.model(inputs.input_ids, inputs.ctx, self.kv_caches)    # [T, hidden]
            if not inputs.sample_seqs:
                return RunnerOutput(sampled_token_ids={})
            sampled = hidden.index_select(0, inputs.sample_rows)                    # [n, hidden]
            logits = self.model.compute_logits(sampled)
            lora = inputs.ctx.lora
            if lora is not None and lora.vocab is not None:                      # adapters' own lm_head
                logits = lora.vocab.widened_logits(sampled, logits, lora.info.token_slots.index_select(
                    0, inputs.sample_rows), lora.info.active_slots)              # [n, V or a resized V']
            result = self.sampler(logits, inputs.sample_seqs)
        seq_ids = [seq.seq_id for seq in inputs.sample_seqs]
        logprobs = None if result.logprobs is None else dict(zip(seq_ids, result.logprobs))
        alternatives = getattr(result, "top_logprobs", None)
        if alternatives is not None:
            alternatives = dict(zip(seq_ids, alternatives))
        return RunnerOutput(sampled_token_ids=dict(zip(seq_ids, result.token_ids)), logprobs=logprobs,
                            top_logprobs=alternatives)

    def prepare(self, batch: ScheduledBatch, adapter_slots: dict[str, int] | None) -> StepInputs:
        """Host-side lists -> one tensor per field (this runs every step: keep it cheap)."""
        bs = self.block_size
        token_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_lens: list[int] = []
        context_lens: list[int] = []
        starts = [0]
        sample_rows: list[int] = []
        sample_seqs: list[Sequence] = []
        for item in batch.items:
            seq, start, n = item.seq, item.start, item.num_new_tokens
            end = start + n
            if len(seq.block_table) * bs < end:
                raise ValueError(f"sequence {seq.seq_id} needs {-(-end // bs)} KV blocks for "
                                 f"{end} tokens but its block table has {len(seq.block_table)}")
            if n == 1:
                token_ids.append(seq.token_at(start))
            else:
                token_ids.extend(seq.all_token_ids[start:end])
            positions.extend(range(start, end))
            table = seq.block_table
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            query_lens.append(n)
            context_lens.append(end)
            starts.append(starts[-1] + n)
            if item.sample:
                sample_rows.append(starts[-1] - 1)
                sample_seqs.append(seq)
        self.model.ensure_positions(max(context_lens))
        max_blocks = max(-(-c // bs) for c in context_lens)
        tables = [_padded(item.seq.block_table, max_blocks) for item in batch.items]
        device = self.device
        attn = AttentionMetadata(
            query_start_loc=torch.tensor(starts, dtype=torch.int64, device=device),
            seq_lens=torch.tensor(context_lens, dtype=torch.int64, device=device),
            block_tables=torch.tensor(tables, dtype=torch.int64, device=device),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
            query_lens=tuple(query_lens), context_lens=tuple(context_lens), block_size=bs)
        ctx = ForwardContext(positions=torch.tensor(positions, dtype=torch.int64, device=device),
                             attn=attn, lora=self._lora_step(batch, adapter_slots))
        return StepInputs(torch.tensor(token_ids, dtype=torch.int64, device=device), ctx,
                          torch.tensor(sample_rows, dtype=torch.int64, device=device), sample_seqs)

    def _lora_step(self, batch: ScheduledBatch, adapter_slots: dict[str, int] | None) -> LoraStep | None:
        """The step's LoRA routing, prepared once for every projection; None without adapters."""
        if not any(item.seq.adapter_key for item in batch.items):
            return None
        if self.lora is None:
            raise ValueError("the batch uses adapters but this runner has no LoRA slot pool")
        adapter_slots = adapter_slots or {}
        token_slots: list[int] = []
        for item in batch.items:
            key = item.seq.adapter_key
            if key is None:
                slot = -1
            elif key in adapter_slots:
                slot = adapter_slots[key]
            else:
                raise ValueError(f"sequence {item.seq.seq_id} uses adapter {key!r}, which has no "
                                 "slot in this step (adapters.activate must load it first)")
            token_slots.extend([slot] * item.num_new_tokens)
        info = LoraBatchInfo.from_token_slots(torch.tensor(token_slots, dtype=torch.int64), self.device)
        return self.lora.prepare_step(info) if info.has_adapters else None


def _padded(block_table: list[int], length: int) -> list[int]:
    row = block_table[:length]
    return row + [0] * (length - len(row))

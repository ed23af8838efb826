"""Per-row logits of packed prefill / decode steps through the real ModelRunner, for the model
oracle tests (test_lora_model, test_lora_moe): each prompt is one Sequence with its own adapter."""

from __future__ import annotations

from typing import Callable

import torch

from loraplex.server.engine.batch import ScheduledBatch, ScheduledSeq
from loraplex.server.engine.runner import ModelRunner
from loraplex.server.engine.sequence import SamplingParams, Sequence
from loraplex.server.model.kv_cache import allocate_kv_caches

Step = Callable[[list[tuple[Sequence, int, int]]], None]      # [(seq, start, num_tokens)]


def runner_rows(model, config, pool, slots, prompts: list[list[int]], row_adapters: list[str | None],
                blocks_per_seq: int, block_size: int) -> tuple[list[Sequence], list[list[torch.Tensor]], Step]:
    """(seqs, rows, step): step(items) runs one batch and appends each item's logits ([vocab]
    each) to rows[seq_id]."""
    caches = allocate_kv_caches(config, blocks_per_seq * len(prompts), block_size, torch.float32)
    runner = ModelRunner(model, config, caches, block_size, sampler=lambda logits, seqs: None, lora=pool)
    seqs = [Sequence(i, list(p), SamplingParams(), adapter_key=key) for i, (p, key) in enumerate(zip(prompts, row_adapters))]
    for i, seq in enumerate(seqs):
        seq.block_table = list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq))
    rows: list[list[torch.Tensor]] = [[] for _ in seqs]

    def step(items: list[tuple[Sequence, int, int]]) -> None:
        batch = ScheduledBatch(tuple(ScheduledSeq(seq, start, n, True) for seq, start, n in items))
        inputs = runner.prepare(batch, slots)
        with torch.inference_mode():
            logits = model.compute_logits(model(inputs.input_ids, inputs.ctx, caches))
        row = 0
        for seq, _, n in items:
            rows[seq.seq_id] += list(logits[row:row + n])
            row += n
    return seqs, rows, step

"""Explicit per-step context passed down the model (no globals), and the token embedding
lookup that reads its adapters."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..lora.delta import LoraStep


@dataclass(frozen=True)
class AttentionMetadata:
    """Where each sequence's queries and keys live for one packed ragged batch.

    query_start_loc: [num_seqs + 1] int64, cumulative query lengths (tokens of seq i are
                     rows query_start_loc[i]:query_start_loc[i+1] of the packed batch).
    seq_lens:        [num_seqs] int64, context length of each sequence after this step
                     (computed tokens before the step + new tokens).
    block_tables:    [num_seqs, max_blocks_per_seq] int64, padded with 0.
    slot_mapping:    [num_tokens] int64, KV cache slot (block * block_size + offset) of
                     each new token.
    query_lens / context_lens: the same lengths as python lists, for cheap host logic.
    """

    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_tables: torch.Tensor
    slot_mapping: torch.Tensor
    query_lens: tuple[int, ...]
    context_lens: tuple[int, ...]
    block_size: int

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    @property
    def is_decode_only(self) -> bool:
        return all(q == 1 for q in self.query_lens)


@dataclass(frozen=True)
class ForwardContext:
    """What one forward pass needs besides the token ids, prepared once by the runner."""

    positions: torch.Tensor             # [num_tokens] int64
    attn: AttentionMetadata
    lora: LoraStep | None = None        # the step's LoRA routing; None = no adapter in this batch


def embed_tokens(embed: torch.Tensor, input_ids: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
    """[T] ids -> [T, hidden]: the base's embedding rows, then each row's adapter embedding
    (modules_to_save table or embedding LoRA) where its adapter has one."""
    if ctx.lora is None or ctx.lora.vocab is None:
        return F.embedding(input_ids, embed)
    # ids >= V (a resized vocabulary's added tokens) have no base row: their adapter's table fills them
    hidden = F.embedding(input_ids.clamp(max=embed.shape[0] - 1), embed)
    ctx.lora.vocab.embed(input_ids, hidden, ctx.lora.info.token_slots)
    return hidden

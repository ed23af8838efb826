"""OpenAI-style logit processors for the batched sampler: presence / frequency penalties, min_tokens.

Each has a pure-torch per-row reference twin (`*_reference`, same signature) that the tests
compare against. All run on the logits after the repetition penalty and before temperature.

- presence / frequency (OpenAI semantics, over the tokens generated so far, not the prompt):
  `logits[t] -= frequency_penalty * count[t] + presence_penalty * (count[t] > 0)`.
- min_tokens: while a sequence has fewer than `min_tokens` output tokens, its EOS token ids
  (unless `ignore_eos`, where they cannot stop it anyway) and its `stop_token_ids` are set to -inf.
"""

from __future__ import annotations

import torch

from .sequence import Sequence


def _penalized_rows(seqs: list[Sequence]) -> list[int]:
    return [i for i, s in enumerate(seqs)
            if (s.sampling.presence_penalty or s.sampling.frequency_penalty) and s.output_token_ids]


def apply_presence_frequency(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """logits [n, vocab] -> a new tensor with each row's penalties applied (one scatter-add).

    Rows without penalties (or without output yet) are unchanged; returns `logits` itself
    when no row needs work.
    """
    rows = _penalized_rows(seqs)
    if not rows:
        return logits
    vocab, device = logits.shape[1], logits.device
    row_ids: list[int] = []
    token_ids: list[int] = []
    for r, i in enumerate(rows):
        ids = [t for t in seqs[i].output_token_ids if 0 <= t < vocab]
        token_ids.extend(ids)
        row_ids.extend([r] * len(ids))
    counts = torch.zeros(len(rows), vocab, dtype=logits.dtype, device=device)       # [m, vocab]
    counts.index_put_((torch.tensor(row_ids, dtype=torch.int64, device=device),
                       torch.tensor(token_ids, dtype=torch.int64, device=device)),
                      torch.ones(len(token_ids), dtype=logits.dtype, device=device), accumulate=True)
    frequency = torch.tensor([seqs[i].sampling.frequency_penalty for i in rows],
                             dtype=logits.dtype, device=device)[:, None]             # [m, 1]
    presence = torch.tensor([seqs[i].sampling.presence_penalty for i in rows],
                            dtype=logits.dtype, device=device)[:, None]              # [m, 1]
    index = torch.tensor(rows, dtype=torch.int64, device=device)
    penalty = frequency * counts + presence * (counts > 0).to(logits.dtype)          # [m, vocab]
    return logits.index_add(0, index, -penalty)


def apply_presence_frequency_reference(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """Twin of `apply_presence_frequency`: one row and one token at a time."""
    out = logits.clone()
    vocab = logits.shape[1]
    for i, seq in enumerate(seqs):
        counts: dict[int, int] = {}
        for token in seq.output_token_ids:
            if 0 <= token < vocab:
                counts[token] = counts.get(token, 0) + 1
        for token, count in counts.items():
            out[i, token] -= seq.sampling.frequency_penalty * count + seq.sampling.presence_penalty
    return out


def _banned_until_min(seq: Sequence, vocab: int) -> list[int]:
    if seq.num_output_tokens >= seq.sampling.min_tokens:
        return []
    eos = () if seq.sampling.ignore_eos else seq.eos_token_ids
    return sorted({t for t in (*eos, *seq.sampling.stop_token_ids) if 0 <= t < vocab})


def apply_min_tokens(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """logits [n, vocab] -> a new tensor with EOS / stop token ids at -inf for rows below
    their min_tokens; returns `logits` itself when no row needs it."""
    vocab = logits.shape[1]
    row_ids: list[int] = []
    token_ids: list[int] = []
    for i, seq in enumerate(seqs):
        banned = _banned_until_min(seq, vocab) if seq.sampling.min_tokens else []
        token_ids.extend(banned)
        row_ids.extend([i] * len(banned))
    if not token_ids:
        return logits
    device = logits.device
    out = logits.clone()
    out[torch.tensor(row_ids, dtype=torch.int64, device=device),
        torch.tensor(token_ids, dtype=torch.int64, device=device)] = float("-inf")
    return out


def apply_min_tokens_reference(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """Twin of `apply_min_tokens`: one row at a time."""
    out = logits.clone()
    for i, seq in enumerate(seqs):
        for token in _banned_until_min(seq, logits.shape[1]):
            out[i, token] = float("-inf")
    return out


def apply_openai_processors(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """Both processors, in the sampler's order (penalties, then the min_tokens mask)."""
    return apply_min_tokens(apply_presence_frequency(logits, seqs), seqs)

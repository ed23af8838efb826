"""The N most likely alternatives of each sampled token, for `top_logprobs`.

They come from the same distribution as the chosen token's `logprob` (SampleResult): for
greedy rows log_softmax of the processed logits; for sampled rows log_softmax of
logits / temperature after the row's top-k / top-p cut (full stable sort, the reference
semantics of `mask_top_k_top_p`, which the sampler's fast path provably matches). Tokens the
cut removed (-inf) are never listed, so a row may get fewer than N alternatives.
"""

from __future__ import annotations

from typing import Callable

import torch

from .sequence import Sequence

TopLogprobs = tuple[tuple[int, float], ...]     # (token id, log-probability), most likely first
MaskFn = Callable[..., torch.Tensor]            # sampling.mask_top_k_top_p


def _distribution(logits: torch.Tensor, seq: Sequence, mask_top_k_top_p: MaskFn) -> torch.Tensor:
    """[vocab] log-probabilities row `logits` [vocab] is sampled from."""
    sampling = seq.sampling
    if sampling.greedy:
        return torch.log_softmax(logits, dim=-1)
    z = (logits / max(sampling.temperature, 1e-5))[None, :]                      # [1, vocab]
    vocab = z.shape[1]
    top_k = sampling.top_k if 0 < sampling.top_k < vocab else vocab
    if top_k < vocab or sampling.top_p < 1.0:
        z = mask_top_k_top_p(z, torch.tensor([[top_k]], device=z.device),
                             torch.tensor([[sampling.top_p]], dtype=z.dtype, device=z.device),
                             use_top_k=top_k < vocab, use_top_p=sampling.top_p < 1.0)
    return torch.log_softmax(z[0], dim=-1)


def top_logprobs(logits: torch.Tensor, seqs: list[Sequence], mask_top_k_top_p: MaskFn) -> list[TopLogprobs] | None:
    """logits [n, vocab] (processed, as the sampler saw them) -> per row its top alternatives
    (empty for rows that did not ask); None when no row asked. `mask_top_k_top_p` is the
    sampler's reference cut (passed in, so this module does not import the sampler)."""
    wanted = [s.sampling.top_logprobs for s in seqs]
    if not any(wanted):
        return None
    result: list[TopLogprobs] = []
    for row, (seq, count) in enumerate(zip(seqs, wanted)):
        if not count:
            result.append(())
            continue
        log_probs = _distribution(logits[row].float(), seq, mask_top_k_top_p)                    # [vocab]
        values, ids = torch.topk(log_probs, min(count, log_probs.shape[0]))      # ties: any order
        pairs = sorted(zip(ids.tolist(), values.tolist()), key=lambda p: (-p[1], p[0]))
        result.append(tuple((int(t), float(v)) for t, v in pairs if v != float("-inf")))
    return result

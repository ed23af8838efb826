"""Batched token sampling: greedy, temperature, top-k, top-p, repetition penalty, seeds.

Every row of a batch may use different settings. Sampling is an exponential race
(`argmax(logits - log E)`, `E ~ Exp(1)`), which draws exactly from softmax(logits). Rows
with a `seed` take their noise from a counter-based generator keyed on (seed, number of
tokens generated so far, token id), so a seeded request produces the same tokens whatever
else is in the batch and in whatever order; unseeded rows use the sampler's own generator.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .sequence import Sequence

_MASK32 = 0xFFFFFFFF
_MIN_TEMPERATURE = 1e-5     # below this, logits / T overflows float32


@dataclass(frozen=True)
class SampleResult:
    """One chosen token per row, and optionally its log-probability.

    `logprobs[i]` is the log-probability of `token_ids[i]` under the final processed
    distribution of row i (after repetition penalty, temperature, top-k and top-p; for
    greedy rows, softmax of the penalized logits). None when no sequence asked for logprobs.
    """

    token_ids: list[int]
    logprobs: list[float] | None


@dataclass(frozen=True)
class _RowParams:
    """Per-row settings of the sampled (non-greedy) rows, as device tensors."""

    row_list: list[int]          # the same indices on the host
    rows: torch.Tensor           # [m] int64 row indices into the batch
    temperature: torch.Tensor    # [m, 1] float32
    top_k: torch.Tensor          # [m, 1] int64, vocab_size when disabled
    top_p: torch.Tensor          # [m, 1] float32
    use_top_k: bool
    use_top_p: bool


def _fmix32(x: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finalizer (full avalanche) on int64 tensors holding uint32 values.

    The products need up to 64 bits and wrap in int64 (two's complement, as on every torch
    backend); only their low 32 bits are kept, and those are exact either way.
    """
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & _MASK32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & _MASK32
    return x ^ (x >> 16)


def _fmix32_int(x: int) -> int:
    """Python-int twin of `_fmix32`."""
    x &= _MASK32
    x ^= x >> 16
    x = (x * 0x85EBCA6B) & _MASK32
    x ^= x >> 13
    x = (x * 0xC2B2AE35) & _MASK32
    return x ^ (x >> 16)


def _row_keys(seed: int, step: int) -> tuple[int, int]:
    """Two 32-bit keys for one (seed, step) pair; seed and step may use all 63 bits."""
    k = _fmix32_int(seed ^ 0x9E3779B9)
    k = _fmix32_int(k ^ (seed >> 32) ^ 0x7F4A7C15)
    k = _fmix32_int(k ^ (step & _MASK32) ^ 0x632BE5AB)
    k = _fmix32_int(k ^ (step >> 32) ^ 0x85157AF5)
    return k, _fmix32_int(k ^ 0x2545F491)


def counter_uniform(keys: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Uniforms in (0, 1], one per (row, token id), a pure function of the row keys.

    keys: [m, 2] int64 (each value in [0, 2**32)). Returns [m, vocab_size] float32. The token
    hash is computed once over the vocab; each row then costs one mixing round.
    """
    token = torch.arange(vocab_size, dtype=torch.int64, device=keys.device)   # [vocab]
    token_hash = _fmix32(token * 0x9E3779B9 & _MASK32)[None, :]                # [1, vocab]
    h = _fmix32(((token_hash ^ keys[:, :1]) + keys[:, 1:]) & _MASK32)          # [m, vocab]
    return (h.to(torch.float32) + 0.5) * (1.0 / 2**32)


def apply_repetition_penalty(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """HF semantics over prompt + output tokens: divide positive logits, multiply negative.

    logits: [n, vocab]. Returns a new tensor; rows with penalty 1 are unchanged.
    """
    rows = [i for i, s in enumerate(seqs) if s.sampling.repetition_penalty != 1.0]
    if not rows:
        return logits
    vocab = logits.shape[1]
    device = logits.device
    row_ids: list[int] = []
    token_ids: list[int] = []
    for i in rows:
        ids = [t for t in seqs[i].prompt_token_ids + seqs[i].output_token_ids if 0 <= t < vocab]
        token_ids.extend(ids)
        row_ids.extend([i] * len(ids))
    seen = torch.zeros_like(logits, dtype=torch.bool)                          # [n, vocab]
    seen[torch.tensor(row_ids, dtype=torch.int64, device=device),
         torch.tensor(token_ids, dtype=torch.int64, device=device)] = True
    penalty = torch.ones(len(seqs), 1, dtype=logits.dtype, device=device)      # [n, 1]
    penalty[rows, 0] = torch.tensor([seqs[i].sampling.repetition_penalty for i in rows],
                                    dtype=logits.dtype, device=device)
    penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalized, logits)


def mask_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                     use_top_k: bool = True, use_top_p: bool = True) -> torch.Tensor:
    """Set to -inf every token outside the row's top-k, then outside its top-p nucleus.

    logits: [m, vocab] (temperature already applied); top_k: [m, 1] int64 (vocab = off);
    top_p: [m, 1] float. The nucleus is the smallest set of most likely tokens whose mass
    reaches top_p (the most likely token is always kept). Ties keep the lower token id.
    """
    if not (use_top_k or use_top_p):
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True, stable=True)  # [m, vocab]
    rank = torch.arange(logits.shape[1], device=logits.device)[None, :]               # [1, vocab]
    remove = rank >= top_k if use_top_k else torch.zeros_like(sorted_logits, dtype=torch.bool)
    if use_top_p:
        probs = torch.softmax(sorted_logits.masked_fill(remove, float("-inf")), dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs                              # [m, vocab]
        remove = remove | (mass_before >= top_p)
        remove[:, 0] = False
    remove_by_token = torch.zeros_like(remove).scatter_(1, order, remove)              # [m, vocab]
    return logits.masked_fill(remove_by_token, float("-inf"))


class Sampler:
    """Picks one token per row of a logits batch according to each sequence's SamplingParams."""

    def __init__(self, vocab_size: int, device: str = "cpu", seed: int = 0):
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> SampleResult:
        """logits: [n, vocab] (one row per seq, in seq order). Returns n token ids."""
        if logits.dim() != 2 or logits.shape[0] != len(seqs):
            raise ValueError(f"logits must be [num_seqs={len(seqs)}, vocab]; got {tuple(logits.shape)}")
        logits = apply_repetition_penalty(logits.float(), seqs)                 # [n, vocab]
        chosen = logits.argmax(dim=-1)                                           # [n]
        final = logits                                                           # [n, vocab]
        params = self._row_params(seqs, logits.shape[1])
        if params is not None:
            processed = mask_top_k_top_p(logits[params.rows] / params.temperature,
                                         params.top_k, params.top_p,
                                         params.use_top_k, params.use_top_p)    # [m, vocab]
            noise = self._exponential(seqs, params.row_list, processed.shape[1])
            chosen = chosen.index_copy(0, params.rows, (processed - noise.log()).argmax(dim=-1))
            final = logits.index_copy(0, params.rows, processed)
        logprobs = None
        if any(s.sampling.logprobs for s in seqs):
            logprobs = torch.log_softmax(final, dim=-1).gather(1, chosen[:, None])[:, 0].tolist()
        return SampleResult(token_ids=chosen.tolist(), logprobs=logprobs)

    def _row_params(self, seqs: list[Sequence], vocab: int) -> _RowParams | None:
        rows = [i for i, s in enumerate(seqs) if not s.sampling.greedy]
        if not rows:
            return None
        ks = [seqs[i].sampling.top_k if 0 < seqs[i].sampling.top_k < vocab else vocab for i in rows]
        ps = [seqs[i].sampling.top_p for i in rows]

        def column(values: list, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=self.device)[:, None]

        return _RowParams(
            row_list=rows, rows=torch.tensor(rows, dtype=torch.int64, device=self.device),
            temperature=column([max(seqs[i].sampling.temperature, _MIN_TEMPERATURE) for i in rows],
                               torch.float32),
            top_k=column(ks, torch.int64), top_p=column(ps, torch.float32),
            use_top_k=any(k < vocab for k in ks), use_top_p=any(p < 1.0 for p in ps))

    def _exponential(self, seqs: list[Sequence], rows: list[int], vocab: int) -> torch.Tensor:
        """Exp(1) noise [len(rows), vocab]: counter-based for seeded rows, generator otherwise."""
        noise = torch.empty(len(rows), vocab, dtype=torch.float32, device=self.device)  # [m, vocab]
        seeded = [j for j, i in enumerate(rows) if seqs[i].sampling.seed is not None]
        unseeded = [j for j, i in enumerate(rows) if seqs[i].sampling.seed is None]
        if unseeded:
            fresh = torch.empty(len(unseeded), vocab, dtype=torch.float32, device=self.device)
            fresh.exponential_(generator=self.generator).clamp_min_(1e-30)
            noise.index_copy_(0, torch.tensor(unseeded, device=self.device), fresh)
        if seeded:
            keys = torch.tensor([_row_keys(seqs[rows[j]].sampling.seed, seqs[rows[j]].num_output_tokens)
                                 for j in seeded], dtype=torch.int64, device=self.device)   # [s, 2]
            uniform = counter_uniform(keys, vocab)                                          # [s, vocab]
            noise.index_copy_(0, torch.tensor(seeded, device=self.device), -torch.log1p(-uniform))
        return noise

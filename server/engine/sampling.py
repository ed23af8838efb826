"""Batched token sampling: greedy, temperature, top-k, top-p, repetition / presence / frequency
penalties and min_tokens (penalties.py), top logprobs (top_logprobs.py), seeds.

Every row of a batch may use different settings. A sampled row draws one uniform u and takes
the first token whose cumulative probability (float64) reaches u: inverse-CDF sampling, exact
up to float rounding and one random number per row. Rows with a `seed` take u from a
counter-based hash of (seed, number of tokens generated so far), so a seeded request produces
the same tokens whatever else is in the batch and in whatever order; unseeded rows use the
sampler's own generator.

top-k / top-p rows first look at their `CANDIDATES` most likely tokens (`torch.topk`, ~25x
cheaper than sorting a 49k vocab); when the row's kept set provably lies inside them (top-k
within the candidates, or the candidates' mass reaches top_p, and no tie across the cut) the
result equals the full sort's. Other rows fall back to the full stable sort
(`mask_top_k_top_p`), the reference semantics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .penalties import apply_openai_processors
from .sequence import Sequence
from .top_logprobs import TopLogprobs, top_logprobs

_MASK32 = 0xFFFFFFFF
_MIN_TEMPERATURE = 1e-5     # below this, logits / T overflows float32
CANDIDATES = 256            # tokens a top-k / top-p row looks at before a full sort


@dataclass(frozen=True)
class SampleResult:
    """One chosen token per row, and optionally its log-probability.

    `logprobs[i]` is the log-probability of `token_ids[i]` under the final processed
    distribution of row i (after repetition penalty, temperature, top-k and top-p; for
    greedy rows, softmax of the penalized logits). None when no sequence asked for logprobs.
    """

    token_ids: list[int]
    logprobs: list[float] | None
    top_logprobs: list[TopLogprobs] | None = None    # per row (top_logprobs.py); None if none asked


@dataclass(frozen=True)
class _RowParams:
    """Per-row settings of the sampled (non-greedy) rows, as device tensors."""

    rows: torch.Tensor           # [m] int64 row indices into the batch
    temperature: torch.Tensor    # [m, 1] float32
    top_k: torch.Tensor          # [m, 1] int64, vocab_size when disabled
    top_p: torch.Tensor          # [m, 1] float32
    restricted: list[bool]       # per row: top-k or top-p in use
    uniforms: torch.Tensor       # [m] float64 in (0, 1): each row's draw


def _fmix32_int(x: int) -> int:
    """MurmurHash3's 32-bit finalizer (full avalanche) on a Python int."""
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


def counter_uniform(seed: int, step: int) -> float:
    """A uniform in (0, 1) with 53 random bits: a pure function of (seed, step)."""
    high, low = _row_keys(seed, step)
    return (((high << 21) | (low >> 11)) + 0.5) / 2.0**53


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


def top_candidates(z: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The `count` largest entries of each row in the full stable sort's order (value
    descending, then token id ascending). z: [m, vocab] -> values [m, c], ids [m, c] int64,
    clean [m] bool (False where a tie straddles the cut, so the set is not determined)."""
    vocab = z.shape[1]
    if count >= vocab:
        values, ids = torch.sort(z, dim=-1, descending=True, stable=True)
        return values, ids, torch.ones(z.shape[0], dtype=torch.bool, device=z.device)
    values, ids = torch.topk(z, count + 1, dim=-1)                       # tie order unspecified
    ids, by_id = torch.sort(ids, dim=-1)
    values = values.gather(1, by_id)
    values, by_value = torch.sort(values, dim=-1, descending=True, stable=True)
    ids = ids.gather(1, by_value)
    clean = values[:, count - 1] > values[:, count]
    return values[:, :count], ids[:, :count], clean


def mask_candidates(z: torch.Tensor, values: torch.Tensor, top_k: torch.Tensor,
                    top_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply top-k then top-p to a row's candidates (from `top_candidates`).

    z [m, vocab] (for the full row's normaliser), values [m, c], top_k / top_p [m, 1].
    Returns the masked candidates [m, c] (-inf = removed) and exact [m] bool: True where this
    equals what `mask_top_k_top_p` keeps on the full row.
    """
    vocab, count = z.shape[1], values.shape[1]
    rank = torch.arange(count, device=z.device)[None, :]                     # [1, c]
    remove = rank >= top_k                                                   # [m, c]
    masked = values.masked_fill(remove, float("-inf"))
    k_inside = (top_k[:, 0] <= count) | (count >= vocab)
    # Probabilities as the full path computes them: softmax over the top-k set when top-k is
    # on (all of it lies in the candidates), else over the whole row.
    peak = values[:, :1]                                                     # [m, 1]
    full_norm = torch.exp(z - peak).sum(-1, keepdim=True)                    # [m, 1]
    weights = torch.exp(masked - peak)                                       # [m, c]
    norm = torch.where(top_k < vocab, weights.sum(-1, keepdim=True), full_norm)
    probs = weights / norm                                                   # [m, c]
    mass_before = torch.cumsum(probs, dim=-1) - probs
    nucleus = (mass_before >= top_p) & (top_p < 1.0)      # p = 1: rounding must remove nothing
    nucleus[:, 0] = False
    covered = (probs.sum(-1) >= top_p[:, 0]) | (top_p[:, 0] >= 1.0)
    exact = k_inside | ((top_k[:, 0] >= vocab) & covered)
    return masked.masked_fill(nucleus, float("-inf")), exact


def inverse_cdf(logits: torch.Tensor, uniforms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one column per row of softmax(logits) with the row's uniform.

    logits [m, w] (-inf = excluded), uniforms [m] float64 in (0, 1). Returns the column
    indices [m] int64 and their log-probabilities [m] float32.
    """
    log_probs = torch.log_softmax(logits, dim=-1)                            # [m, w]
    cdf = torch.cumsum(log_probs.exp().double(), dim=-1)                     # [m, w] float64 sums
    target = (uniforms * cdf[:, -1])[:, None]                                # [m, 1]
    index = torch.searchsorted(cdf, target).clamp_max_(logits.shape[1] - 1)  # first cdf >= u
    return index[:, 0], log_probs.gather(1, index)[:, 0]


ArgmaxFn = Callable[[torch.Tensor], torch.Tensor]    # logits [n, vocab] float32 -> [n] int64
LogitsMask = Callable[[torch.Tensor, list[Sequence]], torch.Tensor]   # [n, vocab] -> [n, vocab]


def argmax_rows_ref(logits: torch.Tensor) -> torch.Tensor:
    """[n, vocab] -> [n] int64, each row's first maximum (NaN counts as largest).

    The pure-torch twin of the native kernel argmax_rows (10x faster on a 2-core
    CPU at [16, 49152]: torch's CPU argmax runs one scalar pass per row).
    """
    return logits.argmax(dim=-1)


class Sampler:
    """Picks one token per row of a logits batch according to each sequence's SamplingParams.

    argmax: the greedy rows' kernel (argmax_rows_ref, or the native argmax_rows with its semantics).
    logits_mask: applied after the repetition penalty, before any choice (structured output:
    sets disallowed tokens of constrained rows to -inf; other rows must come back unchanged).
    """

    def __init__(self, vocab_size: int, device: str = "cpu", seed: int = 0,
                 argmax: ArgmaxFn = argmax_rows_ref, logits_mask: LogitsMask | None = None):
        self.vocab_size = vocab_size
        self.argmax = argmax
        self.logits_mask = logits_mask
        self.device = torch.device(device)
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(seed)

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> SampleResult:
        """logits: [n, vocab] (one row per seq, in seq order). Returns n token ids."""
        if logits.dim() != 2 or logits.shape[0] != len(seqs):
            raise ValueError(f"logits must be [num_seqs={len(seqs)}, vocab]; got {tuple(logits.shape)}")
        logits = apply_repetition_penalty(logits.float(), seqs)                 # [n, vocab]
        logits = apply_openai_processors(logits, seqs)                           # [n, vocab]
        if self.logits_mask is not None:
            logits = self.logits_mask(logits, seqs)
        want_logprobs = any(s.sampling.returns_logprobs for s in seqs)
        alternatives = top_logprobs(logits, seqs, mask_top_k_top_p)
        params = self._row_params(seqs, logits.shape[1])
        if params is not None and params.rows.numel() == len(seqs):             # all sampled
            chosen, logprobs = self._sample(logits, params)
            return SampleResult(token_ids=chosen.tolist(),
                                logprobs=logprobs.tolist() if want_logprobs else None,
                                top_logprobs=alternatives)
        chosen = self.argmax(logits.contiguous())                                # [n]
        logprobs = None
        if want_logprobs:
            logprobs = torch.log_softmax(logits, dim=-1).gather(1, chosen[:, None])[:, 0]
        if params is not None:
            tokens, token_logprobs = self._sample(logits.index_select(0, params.rows), params)
            chosen = chosen.index_copy(0, params.rows, tokens)
            if logprobs is not None:
                logprobs = logprobs.index_copy(0, params.rows, token_logprobs)
        return SampleResult(token_ids=chosen.tolist(),
                            logprobs=None if logprobs is None else logprobs.tolist(),
                            top_logprobs=alternatives)

    def _sample(self, logits: torch.Tensor, params: _RowParams) -> tuple[torch.Tensor, torch.Tensor]:
        """logits [m, vocab] of the sampled rows -> token ids [m], log-probabilities [m]."""
        z = logits / params.temperature                                          # [m, vocab]
        if not any(params.restricted):
            return inverse_cdf(z, params.uniforms)
        tokens = torch.empty(z.shape[0], dtype=torch.int64, device=z.device)
        token_logprobs = torch.empty(z.shape[0], dtype=torch.float32, device=z.device)
        full = torch.tensor([not r for r in params.restricted], device=z.device)  # [m] bool
        restricted = ~full
        if bool(restricted.any()):
            rows = torch.nonzero(restricted).flatten()
            values, ids, clean = top_candidates(z[rows], CANDIDATES)
            masked, exact = mask_candidates(z[rows], values, params.top_k[rows], params.top_p[rows])
            fast = clean & exact
            if bool(fast.any()):
                index, lp = inverse_cdf(masked[fast], params.uniforms[rows[fast]])
                tokens[rows[fast]] = ids[fast].gather(1, index[:, None])[:, 0]
                token_logprobs[rows[fast]] = lp
            slow = rows[~fast]                                                   # full sort
            if slow.numel():
                top_k, top_p = params.top_k[slow], params.top_p[slow]
                z[slow] = mask_top_k_top_p(z[slow], top_k, top_p,
                                           use_top_k=bool((top_k < z.shape[1]).any()),
                                           use_top_p=bool((top_p < 1.0).any()))
                full[slow] = True
        if bool(full.any()):
            rows = torch.nonzero(full).flatten()
            tokens[rows], token_logprobs[rows] = inverse_cdf(z[rows], params.uniforms[rows])
        return tokens, token_logprobs

    def _row_params(self, seqs: list[Sequence], vocab: int) -> _RowParams | None:
        rows = [i for i, s in enumerate(seqs) if not s.sampling.greedy]
        if not rows:
            return None
        ks = [seqs[i].sampling.top_k if 0 < seqs[i].sampling.top_k < vocab else vocab for i in rows]
        ps = [seqs[i].sampling.top_p for i in rows]

        def column(values: list, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=self.device)[:, None]

        return _RowParams(
            rows=torch.tensor(rows, dtype=torch.int64, device=self.device),
            temperature=column([max(seqs[i].sampling.temperature, _MIN_TEMPERATURE) for i in rows],
                               torch.float32),
            top_k=column(ks, torch.int64), top_p=column(ps, torch.float32),
            restricted=[k < vocab or p < 1.0 for k, p in zip(ks, ps)],
            uniforms=self._uniforms([seqs[i] for i in rows]))

    def _uniforms(self, seqs: list[Sequence]) -> torch.Tensor:
        """[m] float64 in (0, 1): counter-based for seeded rows, the generator's otherwise."""
        fresh = torch.rand(len(seqs), dtype=torch.float64, generator=self.generator).tolist()
        values = [counter_uniform(s.sampling.seed, s.num_output_tokens) if s.sampling.seed is not None
                  else max(u, 2.0**-53) for s, u in zip(seqs, fresh)]
        return torch.tensor(values, dtype=torch.float64, device=self.device)

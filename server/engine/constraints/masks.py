"""Per-step token bitmasks for the constrained rows of a batch, and the sampler's hook.

The engine calls `begin_step` with the step's sampled sequences before the forward pass: the
masks of the constrained ones are filled on a background thread (llguidance drops the GIL)
and expanded there to one bool per vocabulary column (numpy, outside torch's thread pool),
while the model runs. The sampler calls the object on the logits (`__call__`): it waits for
the masks and sets the disallowed tokens of constrained rows to -inf in place (numpy putmask
per row); unconstrained rows are not touched. After sampling, `end_step` advances each guide by its sampled token.

Mask cost bound (issue 31, defect 7): the compiler refuses a grammar whose first mask costs
more than the budget (--constraint-mask-budget); a grammar can still be cheap at its start
and costly later (an ambiguous grammar's Earley sets grow with the text). So every row's mask
is timed on every step, and a request whose mask costs more than the budget on `strikes`
tokens (timing noise on a busy machine makes one slow token no proof) ends with a
RequestRejected naming the budget. Unconstrained rows so wait at most the budget per
constrained row per step (divided among the mask threads), beyond the strikes each costly
request spends (each of those bounded by llguidance's per-mask limits), and only for the part
of the masks' time the forward pass does not cover.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..sequence import Sequence


def disallowed_tokens(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """bitmask [m, words] int32 (bit t % 32 of word t // 32 set = token t allowed) -> [m, vocab]
    bool, True where the token is NOT allowed. Columns past words * 32 are disallowed."""
    m = bitmask.shape[0]
    bits = torch.arange(32, dtype=torch.int32, device=bitmask.device)                 # [32]
    allowed = ((bitmask[:, :, None] >> bits) & 1).view(m, -1).to(torch.bool)          # [m, words*32]
    if allowed.shape[1] < vocab:
        allowed = torch.nn.functional.pad(allowed, (0, vocab - allowed.shape[1]))
    return ~allowed[:, :vocab]


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """Set logits[i, t] = -inf where bit t of row i is 0, in place; returns logits [m, vocab].
    The pure-torch reference of the served path (`disallowed_rows` + `mask_rows`)."""
    return logits.masked_fill_(disallowed_tokens(bitmask, logits.shape[1]).to(logits.device), float("-inf"))


def disallowed_rows(bitmask: torch.Tensor, vocab: int) -> np.ndarray:
    """Served twin of `disallowed_tokens` -> [m, vocab] numpy bool (np.unpackbits: no torch
    thread pool, so it can run beside the forward without competing for its threads)."""
    bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=1, bitorder="little")   # [m, words*32]
    if bits.shape[1] < vocab:
        bits = np.pad(bits, ((0, 0), (0, vocab - bits.shape[1])))
    return bits[:, :vocab] == 0


def mask_rows(logits: torch.Tensor, rows: list[int], disallowed: np.ndarray) -> torch.Tensor:
    """logits [n, vocab]: row rows[j] gets -inf where disallowed[j]; in place on CPU (numpy
    putmask per row: no gather/scatter of the batch), through index ops elsewhere."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32:
        logits = logits.contiguous()
        values = logits.numpy()                                               # shares memory
        width = disallowed.shape[1]    # logits may be wider (a resized vocabulary's rows): those ids stay -inf
        for j, row in enumerate(rows):
            np.putmask(values[row, :width], disallowed[j], -np.inf)
        return logits
    index = torch.tensor(rows, dtype=torch.int64, device=logits.device)
    mask = torch.from_numpy(disallowed).to(logits.device)
    if mask.shape[1] < logits.shape[1]:
        mask = torch.nn.functional.pad(mask, (0, logits.shape[1] - mask.shape[1]), value=False)
    masked = logits.index_select(0, index).masked_fill_(mask, float("-inf"))
    return logits.index_copy(0, index, masked)


@dataclass
class MaskStats:
    """Cumulative cost of masking: fill (background thread), wait (what the step lost) and
    apply (the masked_fill on the constrained rows), in seconds."""

    num_steps: int = 0
    num_rows: int = 0
    fill_s: float = 0.0
    wait_s: float = 0.0
    apply_s: float = 0.0


MASK_STRIKES = 3      # tokens a request's mask may cost over the budget before it is ended


@dataclass
class _Step:
    rows: dict[int, int]          # seq_id -> mask row
    bitmask: torch.Tensor         # [num_constrained, words] int32
    pending: Future | None        # -> _Filled
    disallowed: np.ndarray | None = None
    costs_ms: list[float] | None = None   # per mask row, only when the fill took over the budget


@dataclass(frozen=True)
class _Filled:
    disallowed: np.ndarray        # [num_constrained, lm_vocab] bool
    costs_ms: list[float] | None  # per row (see _Step)


class GuidedDecoding:
    """The batch side of structured output. begin_step / __call__ / end_step run on the engine
    thread; only the mask fill runs on this object's worker thread."""

    def __init__(self, vocab_size: int, lm_vocab_size: int, overlap: bool = True,
                 max_mask_ms: float = float("inf"), strikes: int = MASK_STRIKES):
        """vocab_size: the bitmask width in tokens; lm_vocab_size: the logits' columns;
        max_mask_ms: the budget per constrained row and token (see the module docstring)."""
        self.num_words = -(-vocab_size // 32)
        self.lm_vocab_size = lm_vocab_size
        self.overlap = overlap
        self.max_mask_ms = max_mask_ms
        self.strikes = strikes
        self.stats = MaskStats()
        self._executor: Any = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loraplex-masks") if overlap else None
        self._step: _Step | None = None

    def begin_step(self, seqs: list[Sequence]) -> None:
        """Start computing the masks of the constrained sequences among the step's sampled ones."""
        guided = [seq for seq in seqs if seq.guide is not None]
        if not guided:
            self._step = None
            return
        bitmask = torch.empty(len(guided), self.num_words, dtype=torch.int32)     # [n, words]
        jobs = [(seq.guide.matcher, row) for row, seq in enumerate(guided)]
        step = _Step(rows={seq.seq_id: row for row, seq in enumerate(guided)}, bitmask=bitmask, pending=None)
        if self._pool is not None:
            step.pending = self._pool.submit(self._fill, jobs, bitmask)
        else:
            filled = self._fill(jobs, bitmask)
            step.disallowed, step.costs_ms = filled.disallowed, filled.costs_ms
        self._step = step
        self.stats.num_steps += 1
        self.stats.num_rows += len(guided)

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """Sampler hook: logits [n, vocab] of `seqs` -> the same tensor with constrained rows masked."""
        step = self._step
        if step is None:
            return logits
        if step.pending is not None:
            started = time.perf_counter()
            filled = step.pending.result()
            step.disallowed, step.costs_ms, step.pending = filled.disallowed, filled.costs_ms, None
            self.stats.wait_s += time.perf_counter() - started
        started = time.perf_counter()
        pairs = [(i, step.rows[seq.seq_id]) for i, seq in enumerate(seqs) if seq.seq_id in step.rows]
        if pairs:
            logits = mask_rows(logits, [i for i, _ in pairs], step.disallowed[[r for _, r in pairs]])
        self.stats.apply_s += time.perf_counter() - started
        return logits

    def end_step(self, seqs: list[Sequence], token_ids: dict[int, int]) -> set[int]:
        """Advance each constrained sequence by its sampled token (token_ids: seq_id -> token;
        a sequence without one failed); returns the seq ids whose grammar refused their token
        (their guide's `error` says why; a mask over the budget on `strikes` tokens is one)."""
        step, self._step = self._step, None
        timed = {} if step is None or step.costs_ms is None else step.rows      # seq_id -> row
        refused = set()
        for seq in seqs:
            token = token_ids.get(seq.seq_id)
            if seq.guide is None or token is None:
                continue
            costly = seq.seq_id in timed and not self._within_budget(seq.guide, step.costs_ms[timed[seq.seq_id]])
            if costly or not seq.guide.check_mask() or not seq.guide.accept(token):
                refused.add(seq.seq_id)
        return refused

    def _within_budget(self, guide, cost_ms: float) -> bool:
        """Count a mask over the budget against its request; False (and the guide's error set,
        the request's fault) at the `strikes`-th."""
        if cost_ms <= self.max_mask_ms:
            return True
        guide.costly_masks += 1
        if guide.costly_masks < self.strikes:
            return True
        guide.error = (f"the {guide.kind} took {cost_ms:.0f} ms per token to enforce ({guide.costly_masks} tokens "
                       f"over the budget); this server enforces constraints up to {self.max_mask_ms:g} ms per "
                       "token (--constraint-mask-budget); simplify it")
        guide.request_fault = True
        return False

    def _fill(self, jobs: list[tuple[Any, int]], bitmask: torch.Tensor) -> _Filled:
        """Compute the bitmask rows, each timed (a matcher caches its mask: a row cannot be
        timed again afterwards), then expand them: disallowed [n, lm_vocab] bool. Rows run on
        up to `workers` threads (llguidance drops the GIL), as its own executor would."""
        started = time.perf_counter()
        row_bytes = self.num_words * 4

        def one(job: tuple[Any, int]) -> float:
            matcher, row = job
            row_started = time.perf_counter()
            matcher.unsafe_compute_mask_ptr(bitmask.data_ptr() + row * row_bytes, row_bytes)
            return (time.perf_counter() - row_started) * 1000

        if len(jobs) > 1 and self._workers() > 1:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=self._workers(), thread_name_prefix="loraplex-mask-rows")
            times = list(self._executor.map(one, jobs))
        else:
            times = [one(job) for job in jobs]
        costs = [0.0] * bitmask.shape[0]
        for (_, row), cost in zip(jobs, times):
            costs[row] = cost
        disallowed = disallowed_rows(bitmask, self.lm_vocab_size)
        self.stats.fill_s += time.perf_counter() - started
        return _Filled(disallowed, costs if max(costs, default=0.0) > self.max_mask_ms else None)

    @staticmethod
    def _workers() -> int:
        """llguidance's executor default: 80% of the CPUs, at most 32."""
        return max(1, min(32, int(0.8 * (os.cpu_count() or 1))))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

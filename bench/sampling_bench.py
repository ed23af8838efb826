"""Sampling cost per step on real logits: the sampler as served vs a full-sort reference.

The logits are the default model's next-token logits over a real text (float32, 49k vocab).
The reference applies top-k/top-p with one stable sort of the whole vocab per row
(`mask_top_k_top_p`) before the same inverse-CDF draw: what sampling costs without the
top-k pre-filter. Both include temperature scaling; the served sampler also applies the
repetition-penalty check and handles seeds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from common import PROMPT_TEXT, time_it

SETTINGS = {   # label -> SamplingParams keyword arguments
    "greedy": {},
    "temperature 0.8": {"temperature": 0.8},
    "temperature 0.8, top_p 0.9": {"temperature": 0.8, "top_p": 0.9},
    "temperature 1.0, top_k 50, top_p 0.95, seed": {"temperature": 1.0, "top_k": 50, "top_p": 0.95,
                                                   "seed": 7},
}


@dataclass(frozen=True)
class SamplingResult:
    batch: int
    label: str
    served_ms: float
    full_sort_ms: float


def real_logits(model_dir: Path, tokenizer, rows: int) -> torch.Tensor:
    """[rows, vocab] float32 next-token logits of the default model at successive positions."""
    from transformers import AutoModelForCausalLM

    ids = tokenizer(PROMPT_TEXT * 4)["input_ids"][: rows + 8]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        logits = model(torch.tensor([ids])).logits[0, 8:8 + rows]
    return logits.float().contiguous()


def full_sort_sample(logits: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """Reference: one stable sort of the whole vocab per row for top-k/top-p, then the same
    inverse-CDF draw (what sampling costs without the top-k pre-filter)."""
    from loraplex.server.engine.sampling import inverse_cdf, mask_top_k_top_p

    if not kwargs:
        return logits.argmax(-1)
    rows, vocab = logits.shape
    z = logits / kwargs["temperature"]
    top_k = torch.full((rows, 1), kwargs.get("top_k") or vocab)
    top_p = torch.full((rows, 1), kwargs.get("top_p", 1.0))
    if kwargs.get("top_k") or kwargs.get("top_p", 1.0) < 1.0:
        z = mask_top_k_top_p(z, top_k, top_p)
    return inverse_cdf(z, torch.rand(rows, dtype=torch.float64))[0]


def run_sampling_bench(model_dir: Path, batches=(16, 64), log=print) -> list[SamplingResult]:
    from transformers import AutoTokenizer

    from loraplex.server.engine.sampling import Sampler
    from loraplex.server.engine.sequence import SamplingParams, Sequence
    from loraplex.server.kernels.registry import KernelSet

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    logits = real_logits(model_dir, tokenizer, max(batches))
    kernels = KernelSet.resolve("auto", torch.float32, "cpu", log)   # as the server builds it
    served = Sampler(logits.shape[1], argmax=kernels.get("argmax_rows"))
    results = []
    for batch in batches:
        for label, kwargs in SETTINGS.items():
            seqs = [Sequence(i, [1, 2, 3], SamplingParams(**kwargs)) for i in range(batch)]
            rows = logits[:batch]
            ours = min(time_it(lambda: served(rows, seqs), repeats=5).median_s for _ in range(2))
            theirs = min(time_it(lambda: full_sort_sample(rows, kwargs), repeats=3).median_s
                         for _ in range(2))
            results.append(SamplingResult(batch, label, ours * 1e3, theirs * 1e3))
            log(f"  batch {batch:3d} {label:45s}: {ours * 1e3:7.2f} ms (full sort {theirs * 1e3:7.2f} ms)")
    return results

"""One fidelity row: perplexity, greedy agreement with a reference, resident bytes."""

from __future__ import annotations

from dataclasses import dataclass

from ...adapters_store.types import LoadedAdapter
from .scoring import Scorer


@dataclass(frozen=True)
class FidelityRow:
    name: str
    perplexity: float
    agreement: float          # fraction of greedy tokens equal to the reference's, position by position
    resident_bytes: int       # decoder linear weights (+ adapter factors when served unmerged)


def greedy_agreement(ours: list[list[int]], reference: list[list[int]]) -> float:
    """Fraction of positions where the greedy tokens match (over all prompts)."""
    total = sum(len(r) for r in reference)
    same = sum(a == b for o, r in zip(ours, reference) for a, b in zip(o, r))
    return same / total if total else 1.0


def measure(name: str, scorer: Scorer, adapter: LoadedAdapter | None, text_ids: list[int],
            prompts: list[list[int]], max_new_tokens: int,
            reference: list[list[int]] | None) -> tuple[FidelityRow, list[list[int]]]:
    """Score `text_ids` and greedy-decode `prompts` with scorer (+ adapter, unmerged)."""
    scorer.set_adapter(adapter)
    ppl = scorer.perplexity(text_ids).perplexity
    tokens = [scorer.greedy(p, max_new_tokens) for p in prompts]
    agreement = greedy_agreement(tokens, reference) if reference is not None else 1.0
    size = scorer.resident_bytes() + (adapter.nbytes if adapter is not None else 0)
    return FidelityRow(name, ppl, agreement, size), tokens


def markdown_table(rows: list[FidelityRow]) -> str:
    lines = ["| serving choice | perplexity | greedy agreement | resident bytes (MiB) |",
             "|---|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row.name} | {row.perplexity:.4f} | {row.agreement:.1%} | "
                     f"{row.resident_bytes / 2**20:.1f} |")
    return "\n".join(lines)

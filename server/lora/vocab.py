"""Per-request vocabulary adapters: embed_tokens / lm_head LoRA and modules_to_save tables.

Each device slot may hold an adapter's own vocabulary tensors (adapters_store.types.VocabWeights).
Rows of a batch whose adapter has them get, as PEFT computes them:

    embedding   h = E_a[ids]                       (modules_to_save embed_tokens: its own table)
                h = E[ids] + s * A^T[ids] @ B^T     (LoRA: lora_embedding_A [r, V], _B [H, r])
    logits      z = h @ W_a^T                      (modules_to_save lm_head: its own table)
                z = h @ W^T + s * (h @ A^T) @ B^T   (LoRA: lora_A [r, H], lora_B [V, r])

Other rows keep the base's. Few adapters carry vocabulary tensors and they are large (a table
is vocab x hidden), so they are kept per slot (not stacked) and applied per active slot.

A resized vocabulary (tables of V' > V rows, the adapter's added tokens after the base's V):
a step whose active slots include one has logits `width(active_slots)` = the largest V' wide;
rows of that adapter get its V' logits (-inf past V' if another is wider), other rows the
base's V logits and -inf for ids >= V, so no row can sample an id its tokenizer lacks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...adapters_store.types import VocabWeights


@dataclass(frozen=True)
class _SlotVocab:
    scale: float
    embed_a_t: torch.Tensor | None       # [V, r]  (lora_embedding_A transposed: a row per token)
    embed_b_t: torch.Tensor | None       # [r, H]
    head_a: torch.Tensor | None          # [r, H]
    head_b: torch.Tensor | None          # [V, r]
    embed_table: torch.Tensor | None     # [V', H] model dtype (V' >= V: a resized vocabulary)
    head_table: torch.Tensor | None      # [V', H] model dtype
    width: int                           # V': ids this adapter's rows may hold and sample


class VocabSlots:
    """The vocabulary tensors of the adapters in device slots, and the per-row hooks the model calls."""

    def __init__(self, vocab_size: int, hidden_size: int, model_dtype: torch.dtype,
                 device: str | torch.device = "cpu"):
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.model_dtype, self.device = model_dtype, torch.device(device)
        self._slots: dict[int, _SlotVocab] = {}

    @property
    def slots(self) -> frozenset[int]:
        return frozenset(self._slots)

    def load(self, slot: int, vocab: VocabWeights, scale: float, lora_dtype: torch.dtype) -> None:
        """Place an adapter's vocabulary tensors in `slot` (shapes checked against the model)."""
        self._check(vocab)

        def lora(t: torch.Tensor | None, transpose: bool = False) -> torch.Tensor | None:
            if t is None:
                return None
            t = t.to(device=self.device, dtype=lora_dtype)
            return t.T.contiguous() if transpose else t.contiguous()

        def table(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device=self.device, dtype=self.model_dtype).contiguous()

        embed_a, embed_b = vocab.embed_lora or (None, None)
        head_a, head_b = vocab.lm_head_lora or (None, None)
        width = max([self.vocab_size] + [t.shape[0] for t in (vocab.embed_table, vocab.lm_head_table) if t is not None])
        self._slots[slot] = _SlotVocab(scale, lora(embed_a, True), lora(embed_b, True), lora(head_a), lora(head_b),
                                       table(vocab.embed_table), table(vocab.lm_head_table), width)

    def clear(self, slot: int) -> None:
        self._slots.pop(slot, None)

    def nbytes(self) -> int:
        return sum(t.nbytes for v in self._slots.values() for t in
                   (v.embed_a_t, v.embed_b_t, v.head_a, v.head_b, v.embed_table, v.head_table) if t is not None)

    def active(self, active_slots: tuple[int, ...]) -> bool:
        """Whether a step over these slots has a vocabulary adapter."""
        return any(slot in self._slots for slot in active_slots)

    def width(self, active_slots: tuple[int, ...]) -> int:
        """Logits columns a step over these slots needs: V, or the largest resized V' among them."""
        return max([self.vocab_size] + [self._slots[s].width for s in active_slots if s in self._slots])

    def embed(self, input_ids: torch.Tensor, hidden: torch.Tensor, token_slots: torch.Tensor) -> None:
        """hidden [T, H] (the base's embeddings) -> each vocabulary adapter's rows, in place.
        input_ids [T], token_slots [T] (-1 = none)."""
        for slot, vocab in self._slots.items():
            if vocab.embed_table is None and vocab.embed_a_t is None:
                continue
            rows = torch.nonzero(token_slots == slot).flatten()                     # [R]
            if rows.numel() == 0:
                continue
            ids = input_ids.index_select(0, rows)
            if vocab.embed_table is not None:
                hidden.index_copy_(0, rows, vocab.embed_table.index_select(0, ids))
                continue
            after_a = vocab.embed_a_t.index_select(0, ids)                          # [R, r]
            delta = (after_a @ vocab.embed_b_t) * vocab.scale                       # [R, H]
            hidden.index_add_(0, rows, delta.to(hidden.dtype))

    def widened_logits(self, hidden: torch.Tensor, logits: torch.Tensor, row_slots: torch.Tensor,
                       active_slots: tuple[int, ...]) -> torch.Tensor:
        """The base's logits [n, V] -> [n, width(active_slots)]: padded with -inf past V when a
        resized vocabulary is active, then each vocabulary adapter's rows (`logits`)."""
        width = self.width(active_slots)
        if width > logits.shape[1]:
            logits = torch.nn.functional.pad(logits, (0, width - logits.shape[1]), value=float("-inf"))
        self.logits(hidden, logits, row_slots)
        return logits

    def logits(self, hidden: torch.Tensor, logits: torch.Tensor, row_slots: torch.Tensor) -> None:
        """logits [n, W] float32 (the base's V columns, -inf past V; W = width(active slots)) -> each
        vocabulary adapter's rows, in place. hidden [n, H] (final-normed), row_slots [n] (-1 = none)."""
        for slot, vocab in self._slots.items():
            if vocab.head_table is None and vocab.head_a is None:
                continue
            rows = torch.nonzero(row_slots == slot).flatten()                       # [R]
            if rows.numel() == 0:
                continue
            h = hidden.index_select(0, rows)                                        # [R, H]
            if vocab.head_table is not None:
                own = (h @ vocab.head_table.T).float()                              # [R, V']
                if own.shape[1] < logits.shape[1]:
                    own = torch.nn.functional.pad(own, (0, logits.shape[1] - own.shape[1]), value=float("-inf"))
                logits.index_copy_(0, rows, own)
                continue
            x = h.to(vocab.head_a.dtype)
            delta = ((x @ vocab.head_a.T) @ vocab.head_b.T) * vocab.scale           # [R, V]
            logits.narrow(1, 0, self.vocab_size).index_add_(0, rows, delta.float())

    def _check(self, vocab: VocabWeights) -> None:
        tables = [t for t in (vocab.embed_table, vocab.lm_head_table) if t is not None]
        for t in tables:
            if t.dim() != 2 or t.shape[0] < self.vocab_size or t.shape[1] != self.hidden_size:
                raise ValueError(f"a vocabulary table of shape {tuple(t.shape)} does not fit this model's "
                                 f"[{self.vocab_size} (or more, a resized vocabulary), {self.hidden_size}]")
        if len({t.shape[0] for t in tables}) > 1 or (len(tables) == 1 and tables[0].shape[0] != self.vocab_size):
            raise ValueError(f"a resized vocabulary needs both embed_tokens and lm_head tables of the same rows, "
                             f"got {[tuple(t.shape) for t in tables]}")
        if vocab.embed_lora is not None:
            a, b = vocab.embed_lora
            if a.shape[1] != self.vocab_size or b.shape[0] != self.hidden_size:
                raise ValueError(f"embed_tokens LoRA A {tuple(a.shape)}, B {tuple(b.shape)} does not fit "
                                 f"vocab {self.vocab_size}, hidden {self.hidden_size}")
        if vocab.lm_head_lora is not None:
            a, b = vocab.lm_head_lora
            if a.shape[1] != self.hidden_size or b.shape[0] != self.vocab_size:
                raise ValueError(f"lm_head LoRA A {tuple(a.shape)}, B {tuple(b.shape)} does not fit "
                                 f"vocab {self.vocab_size}, hidden {self.hidden_size}")

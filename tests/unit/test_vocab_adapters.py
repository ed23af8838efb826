"""Per-row embedding / lm_head adapters (server/lora/vocab.py) vs a float64 oracle, mixed rows."""

from __future__ import annotations

import pytest
import torch

from loraplex.adapters_store.types import VocabWeights
from loraplex.server.lora.vocab import VocabSlots

VOCAB, HIDDEN, RANK = 50, 16, 4


def _slots() -> tuple[VocabSlots, dict[int, VocabWeights], torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    rand = lambda *shape: torch.randn(*shape, generator=gen)      # noqa: E731
    base_embed, base_head = rand(VOCAB, HIDDEN), rand(VOCAB, HIDDEN)
    adapters = {
        0: VocabWeights(embed_lora=(rand(RANK, VOCAB), rand(HIDDEN, RANK)),
                        lm_head_lora=(rand(RANK, HIDDEN), rand(VOCAB, RANK))),
        2: VocabWeights(embed_table=rand(VOCAB, HIDDEN), lm_head_table=rand(VOCAB, HIDDEN)),
        3: VocabWeights(lm_head_lora=(rand(RANK, HIDDEN), rand(VOCAB, RANK))),
    }
    slots = VocabSlots(VOCAB, HIDDEN, torch.float32)
    for slot, vocab in adapters.items():
        slots.load(slot, vocab, scale=2.0, lora_dtype=torch.float32)
    return slots, adapters, base_embed, base_head


def test_embeddings_and_logits_per_row():
    slots, adapters, base_embed, base_head = _slots()
    token_slots = torch.tensor([0, -1, 2, 2, 1, 3, 0])           # slot 1: a plain adapter (no vocab)
    ids = torch.tensor([5, 5, 7, 49, 0, 11, 30])
    hidden = base_embed[ids].clone()
    slots.embed(ids, hidden, token_slots)
    logits = (hidden @ base_head.T).float()
    slots.logits(hidden, logits, token_slots)
    for t, (slot, token) in enumerate(zip(token_slots.tolist(), ids.tolist())):
        vocab = adapters.get(slot)
        h = base_embed[token].double()
        if vocab is not None and vocab.embed_table is not None:
            h = vocab.embed_table[token].double()
        elif vocab is not None and vocab.embed_lora is not None:
            a, b = (w.double() for w in vocab.embed_lora)
            h = h + 2.0 * (a[:, token] @ b.T)
        torch.testing.assert_close(hidden[t].double(), h, rtol=1e-5, atol=1e-5)
        z = h @ base_head.double().T
        if vocab is not None and vocab.lm_head_table is not None:
            z = h @ vocab.lm_head_table.double().T
        elif vocab is not None and vocab.lm_head_lora is not None:
            a, b = (w.double() for w in vocab.lm_head_lora)
            z = z + 2.0 * (h @ a.T) @ b.T
        torch.testing.assert_close(logits[t].double(), z, rtol=1e-4, atol=1e-4)


def test_active_clear_and_shape_checks():
    slots, _, _, _ = _slots()
    assert slots.active((1, 3)) and not slots.active((1,))
    slots.clear(3)
    assert not slots.active((1, 3)) and slots.slots == {0, 2}
    with pytest.raises(ValueError, match="does not fit"):
        slots.load(1, VocabWeights(embed_table=torch.zeros(VOCAB - 1, HIDDEN)), 1.0, torch.float32)
    with pytest.raises(ValueError, match="resized vocabulary needs both embed_tokens and lm_head tables"):
        slots.load(1, VocabWeights(embed_table=torch.zeros(VOCAB + 1, HIDDEN)), 1.0, torch.float32)
    with pytest.raises(ValueError, match="does not fit"):
        slots.load(1, VocabWeights(lm_head_lora=(torch.zeros(RANK, HIDDEN), torch.zeros(VOCAB - 1, RANK))),
                   1.0, torch.float32)


def test_resized_slot_widens_the_logits_of_its_step_only():
    """A slot with V' > V rows: width() is V' only for steps where it is active; its rows get
    V'-wide logits from its table, other rows keep the base's V columns and -inf past them."""
    slots = VocabSlots(VOCAB, HIDDEN, torch.float32)
    wide = VOCAB + 5
    table = torch.randn(wide, HIDDEN)
    slots.load(2, VocabWeights(embed_table=torch.randn(wide, HIDDEN), lm_head_table=table), 1.0, torch.float32)
    assert slots.width((0, 1)) == VOCAB and slots.width((0, 2)) == wide
    hidden = torch.randn(3, HIDDEN)
    base = torch.randn(3, VOCAB)
    logits = torch.nn.functional.pad(base, (0, wide - VOCAB), value=float("-inf"))
    slots.logits(hidden, logits, torch.tensor([-1, 2, 0]))
    torch.testing.assert_close(logits[1], hidden[1] @ table.T)
    assert torch.equal(logits[[0, 2], :VOCAB], base[[0, 2]]) and bool(torch.isinf(logits[[0, 2], VOCAB:]).all())

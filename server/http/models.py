"""GET /v1/models cards from the front door's one-query version listing (frontdoor/admin.py)."""

from __future__ import annotations

from itertools import groupby
from typing import Any


def _card(model_id: str, created: int, owned_by: str, root: str, parent: str | None,
          record: Any = None) -> dict[str, Any]:
    """A model card; adapters' add `has_chat_template` (renders chats with its own template) and, for a
    resized vocabulary, `vocab_size` (its requests' token ids are its own tokenizer's)."""
    card = {"id": model_id, "object": "model", "created": created, "owned_by": owned_by, "root": root,
            "parent": parent}
    if record is not None:
        card["has_chat_template"] = bool(getattr(record, "chat_template", None))
        if getattr(record, "vocab_size", 0):
            card["vocab_size"] = int(record.vocab_size)
    return card


def model_cards(records: list[Any], base_name: str, started: int) -> list[dict[str, Any]]:
    """The base model, then per adapter `name` (its latest READY version) and every `name@N`.
    `records`: READY versions sorted by name, then version."""
    cards = [_card(base_name, started, "loraplex", base_name, None)]
    for name, group in groupby(records, key=lambda record: record.name):
        ready = list(group)
        latest = ready[-1]
        cards.append(_card(name, int(latest.created_at), latest.owner or "loraplex", latest.key, base_name, latest))
        cards += [_card(r.key, int(r.created_at), r.owner or "loraplex", r.key, base_name, r) for r in ready]
    return cards

"""AdapterRecord: one registered adapter version as the registry holds it."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from .ids import make_key
from .types import LoraConfigInfo


class AdapterState(str, Enum):
    """READY: servable. QUARANTINED: kept but refused (e.g. blob corrupted). DELETING: going away."""

    READY = "READY"
    QUARANTINED = "QUARANTINED"
    DELETING = "DELETING"


@dataclass(frozen=True)
class AdapterRecord:
    """One adapter version. size_bytes counts config + weights; sha256 is of the weights file."""

    name: str
    version: int
    sha256: str
    config_sha256: str
    size_bytes: int
    dtype: str
    config: LoraConfigInfo
    owner: str | None
    created_at: float
    state: AdapterState
    state_reason: str = ""
    state_changed_at: float = 0.0                  # when the row entered `state` (0: before schema v2)
    chat_template: str | None = None               # the adapter's own chat template (None: the base's)
    vocab_size: int = 0                            # V' of a resized vocabulary (0: the base's)
    tokenizer_sha256: str | None = None            # blob of its tokenizer files (adapter_tokenizer.py)

    @property
    def resized_vocab(self) -> bool:
        return self.vocab_size > 0 and self.tokenizer_sha256 is not None

    @property
    def key(self) -> str:
        return make_key(self.name, self.version)

    @property
    def private(self) -> bool:
        return self.owner is not None

    def visible_to(self, tenant: str | None) -> bool:
        """Public adapters are visible to everyone; private ones only to their owner."""
        return self.owner is None or self.owner == tenant


@dataclass(frozen=True)
class NewAdapter:
    """What the registry needs to insert a version (the version number is assigned on insert)."""

    name: str
    sha256: str
    config_sha256: str
    size_bytes: int
    dtype: str
    config: LoraConfigInfo
    owner: str | None
    writer_tenant: str | None = None     # who writes it: a tenant may not add versions to a public id
    chat_template: str | None = None     # validated chat template shipped with the adapter
    vocab_size: int = 0                  # V' of a resized vocabulary (0: the base's)
    tokenizer_sha256: str | None = None  # blob of its tokenizer files (stored with the weights)

"""Content hashes of full KV blocks for automatic prefix caching.

A block's K/V depend on every token before it and on the weights that computed them, so the
hash of block i is chained: sha256(hash of block i-1 || token ids of block i), and the chain
starts from a root that names the base model and the adapter (its key "name@version", so a
new version never matches an old one's blocks; the base model alone is its own namespace).
sha256, not Python's hash(): a crafted prompt must not collide with another tenant's prefix.
"""

from __future__ import annotations

import hashlib
from array import array

from .sequence import Sequence

BlockHash = bytes


def root_hash(model_namespace: str, adapter_key: str | None) -> BlockHash:
    """The chain's start for one (base model, adapter) pair."""
    owner = "base" if adapter_key is None else "adapter:" + adapter_key
    return hashlib.sha256(f"loraplex-kv\0{model_namespace}\0{owner}".encode()).digest()


def chain_hash(previous: BlockHash, token_ids: list[int]) -> BlockHash:
    """Hash of one full block given the previous block's hash."""
    return hashlib.sha256(previous + array("q", token_ids).tobytes()).digest()


def extend_block_hashes(seq: Sequence, num_blocks: int, block_size: int, model_namespace: str) -> list[BlockHash]:
    """Make `seq.block_hashes` cover its first `num_blocks` full blocks; returns the list.

    Only blocks whose tokens are all known are hashed (the caller never asks for more)."""
    hashes = seq.block_hashes
    if len(hashes) >= num_blocks:
        return hashes
    previous = hashes[-1] if hashes else root_hash(model_namespace, seq.adapter_key)
    for index in range(len(hashes), num_blocks):
        previous = chain_hash(previous, seq.tokens_between(index * block_size, (index + 1) * block_size))
        hashes.append(previous)
    return hashes

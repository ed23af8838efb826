"""Paged-KV block accounting with automatic prefix caching (integers and hashes only).

The K/V tensors live in the model's cache (`[num_blocks, block_size, num_kv_heads, head_dim]`
per layer); this class hands out block indices, counts references and remembers which full
blocks hold which content (prefix_hash.py) so a later sequence with the same prefix, under the
same adapter version, reuses them instead of recomputing.

A block is in exactly one of three states:
- free: no holder, no content hash (in `_free`);
- cached: no holder, but its content hash is known (in `_evictable`, least recently used
  first); reclaimable: it counts as free and is evicted when the allocator runs out;
- held: referenced by >= 1 sequence (`_holders[block]`, the reference count is its size),
  with or without a content hash.
Only full blocks are ever hashed; a sequence writes only positions >= its computed tokens,
which lie in blocks it alone holds, so shared blocks are never written.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

from .prefix_hash import BlockHash, extend_block_hashes
from .sequence import Sequence


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class PrefixCacheStats:
    """Cumulative prefix-cache counters (tokens for queries/hits, blocks for evictions)."""

    query_tokens: int = 0
    hit_tokens: int = 0
    evicted_blocks: int = 0


class BlockManager:
    """A pool of `num_blocks` KV blocks of `block_size` tokens each.

    enable_caching: reuse full blocks across sequences with the same prefix (prefix caching).
    model_namespace: names the base model in every block hash.
    Allocation is all-or-nothing; cached blocks nobody holds count as free.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True,
                 model_namespace: str = ""):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks ({num_blocks}) and block_size ({block_size}) must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.model_namespace = model_namespace
        # Pop from the end: low block ids are handed out first.
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._evictable: OrderedDict[int, None] = OrderedDict()     # cached, unheld; LRU first
        self._holders: list[set[int]] = [set() for _ in range(num_blocks)]   # block -> seq ids
        self._hash_of: list[BlockHash | None] = [None] * num_blocks
        self._owner_key: list[str | None] = [None] * num_blocks      # adapter key of a hashed block
        self._by_hash: dict[BlockHash, int] = {}
        self._query_tokens = self._hit_tokens = self._evicted = 0

    # ---- counts --------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation may take: free ones plus cached ones nobody holds."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def num_cached_blocks(self) -> int:
        """Blocks whose content is in the prefix cache (held or not)."""
        return len(self._by_hash)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by sequences, in [0, 1]."""
        return self.num_used_blocks / self.num_blocks

    @property
    def stats(self) -> PrefixCacheStats:
        return PrefixCacheStats(self._query_tokens, self._hit_tokens, self._evicted)

    def blocks_for_tokens(self, num_tokens: int) -> int:
        """Blocks a sequence of `num_tokens` tokens occupies in total."""
        return cdiv(max(num_tokens, 0), self.block_size)

    def blocks_needed(self, seq: Sequence, num_tokens_total: int) -> int:
        """Extra blocks `seq` needs so its table covers `num_tokens_total` tokens (>= 0)."""
        return max(0, self.blocks_for_tokens(num_tokens_total) - len(seq.block_table))

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= self.num_free_blocks

    # ---- prefix lookup (admission) -------------------------------------------------------
    def lookup(self, seq: Sequence) -> list[int]:
        """Cached blocks holding `seq`'s longest cached prefix (changes nothing).

        Only blocks wholly inside the first num_tokens - 1 tokens count, so at least one token
        is always left to compute (its logits give the next token)."""
        if not self.enable_caching or seq.block_table:
            return []
        num_full = (seq.num_tokens - 1) // self.block_size
        hashes = extend_block_hashes(seq, num_full, self.block_size, self.model_namespace)
        hits: list[int] = []
        for block_hash in hashes[:num_full]:
            block = self._by_hash.get(block_hash)
            if block is None:
                break
            hits.append(block)
        return hits

    def num_reclaimable_in(self, blocks: list[int]) -> int:
        """How many of `blocks` nobody holds (taking them shrinks what can be allocated)."""
        return sum(1 for block in blocks if not self._holders[block])

    def take_prefix(self, seq: Sequence, hits: list[int]) -> None:
        """Make `seq` (holding no blocks) hold `hits` and count them as computed."""
        if seq.block_table or seq.num_computed_tokens:
            raise RuntimeError(f"sequence {seq.seq_id} already holds blocks; cannot take a cached prefix")
        for block in hits:
            if not self._holders[block]:
                del self._evictable[block]
            self._holders[block].add(seq.seq_id)
        seq.block_table.extend(hits)
        seq.num_registered_blocks = len(hits)
        seq.num_computed_tokens = len(hits) * self.block_size
        if self.enable_caching:
            self._query_tokens += seq.num_tokens
            self._hit_tokens += seq.num_computed_tokens

    # ---- allocation ----------------------------------------------------------------------
    def ensure_capacity(self, seq: Sequence, num_tokens_total: int) -> bool:
        """Grow `seq.block_table` to cover `num_tokens_total` tokens, evicting cached blocks
        (least recently used first) when no free block is left.

        Returns False, changing nothing, when not enough blocks can be had.
        """
        needed = self.blocks_needed(seq, num_tokens_total)
        if needed > self.num_free_blocks:
            return False
        for _ in range(needed):
            block = self._free.pop() if self._free else self._evict_one()
            self._holders[block].add(seq.seq_id)
            seq.block_table.append(block)
        return True

    def _evict_one(self) -> int:
        block, _ = self._evictable.popitem(last=False)
        self._unhash(block)
        self._evicted += 1
        return block

    def register(self, seq: Sequence, num_tokens: int) -> None:
        """Offer `seq`'s full blocks within its first `num_tokens` tokens to the cache.

        Called when those tokens are scheduled: the step's forward writes every layer's K/V
        before any attention reads them, so a sequence admitted later in the same step may
        already share these blocks. A block whose content is already cached elsewhere stays
        private (the first copy keeps the hash)."""
        if not self.enable_caching:
            return
        num_full = min(num_tokens // self.block_size, len(seq.block_table))
        if num_full <= seq.num_registered_blocks:
            return
        hashes = extend_block_hashes(seq, num_full, self.block_size, self.model_namespace)
        for index in range(seq.num_registered_blocks, num_full):
            block, block_hash = seq.block_table[index], hashes[index]
            if self._hash_of[block] is None and block_hash not in self._by_hash:
                self._hash_of[block] = block_hash
                self._owner_key[block] = seq.adapter_key
                self._by_hash[block_hash] = block
        seq.num_registered_blocks = num_full

    def free(self, seq: Sequence, uncache: bool = False) -> None:
        """Drop `seq`'s references and clear its table (a no-op when empty).

        Blocks nobody holds any more stay cached (tail blocks are evicted first) or go back to
        the free list; uncache=True forgets their content first (a failed step may have left
        it half written)."""
        for block in seq.block_table:
            if seq.seq_id not in self._holders[block]:
                raise RuntimeError(f"block {block} in the table of sequence {seq.seq_id} is held by "
                                   f"{sorted(self._holders[block])}, not by it; refusing to free it")
        for block in reversed(seq.block_table):
            if uncache:
                self._unhash(block)
            holders = self._holders[block]
            holders.discard(seq.seq_id)
            if not holders:
                if self._hash_of[block] is None:
                    self._free.append(block)
                else:
                    self._evictable[block] = None
        seq.block_table.clear()
        seq.num_registered_blocks = 0

    # ---- dropping cached content ---------------------------------------------------------
    def drop_adapter(self, adapter_key: str) -> int:
        """Forget every cached block computed with `adapter_key` (deleted or unreachable);
        unheld ones return to the free list. Returns how many were forgotten."""
        blocks = [b for b in range(self.num_blocks) if self._hash_of[b] is not None
                  and self._owner_key[b] == adapter_key]
        for block in blocks:
            self._forget(block)
        return len(blocks)

    def reset(self) -> int:
        """Forget every cached block (held blocks stay with their sequences). Returns how many."""
        blocks = [b for b in range(self.num_blocks) if self._hash_of[b] is not None]
        for block in blocks:
            self._forget(block)
        return len(blocks)

    def _forget(self, block: int) -> None:
        self._unhash(block)
        if not self._holders[block]:
            del self._evictable[block]
            self._free.append(block)

    def _unhash(self, block: int) -> None:
        block_hash = self._hash_of[block]
        if block_hash is not None:
            del self._by_hash[block_hash]
            self._hash_of[block] = None
            self._owner_key[block] = None

    # ---- checking ------------------------------------------------------------------------
    def check_invariants(self, seqs: Iterable[Sequence]) -> None:
        """Raise AssertionError unless refcounts, free list, LRU and hash table agree with `seqs`.

        `seqs` must be every sequence that may hold blocks (e.g. all unfinished ones).
        """
        holders: list[set[int]] = [set() for _ in range(self.num_blocks)]
        for seq in seqs:
            table = seq.block_table
            _expect(len(set(table)) == len(table), f"sequence {seq.seq_id} holds a block twice")
            for block in table:
                _expect(0 <= block < self.num_blocks, f"sequence {seq.seq_id} holds out-of-range block {block}")
                holders[block].add(seq.seq_id)
            _expect(seq.num_registered_blocks <= len(table), f"sequence {seq.seq_id} registered unheld blocks")
        for block, (found, recorded) in enumerate(zip(holders, self._holders)):
            _expect(found == recorded, f"block {block} is held by sequences {sorted(found)} but recorded "
                    f"as held by {sorted(recorded)}")
        refs = [len(h) for h in holders]
        free = set(self._free)
        _expect(len(free) == len(self._free), "the free list holds a block twice")
        _expect(not free & set(self._evictable), "a block is both free and cached")
        for block in range(self.num_blocks):
            block_hash, held = self._hash_of[block], refs[block] > 0
            if block in free:
                _expect(not held and block_hash is None, f"free block {block} is held or hashed")
            elif block in self._evictable:
                _expect(not held and block_hash is not None, f"cached block {block} is held or unhashed")
            else:
                _expect(held, f"block {block} is neither free, cached nor held")
            if block_hash is not None:
                _expect(self._by_hash.get(block_hash) == block, f"block {block}'s hash maps elsewhere")
        _expect(len(self._by_hash) == sum(h is not None for h in self._hash_of), "stale hash table entry")
        _expect(self.enable_caching or not self._by_hash, "blocks are cached with caching off")


def _expect(ok: bool, message: str) -> None:
    if not ok:
        raise AssertionError(message)

"""Paged-KV block accounting: which fixed-size cache blocks each sequence owns (integers only).

The K/V tensors live in the model's cache (`[num_blocks, block_size, num_kv_heads, head_dim]`
per layer); this class only hands out block indices and takes them back.
"""

from __future__ import annotations

from collections.abc import Iterable

from .sequence import Sequence


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class BlockManager:
    """A pool of `num_blocks` KV blocks of `block_size` tokens each.

    Each block is either free or owned by exactly one sequence (recorded in `seq.block_table`
    and, for checking, in an owner table here). Allocation is all-or-nothing.
    """

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks ({num_blocks}) and block_size ({block_size}) must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        # Pop from the end: low block ids are handed out first.
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._owner: list[int | None] = [None] * num_blocks     # block id -> seq_id

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use, in [0, 1]."""
        return self.num_used_blocks / self.num_blocks

    def blocks_for_tokens(self, num_tokens: int) -> int:
        """Blocks a sequence of `num_tokens` tokens occupies in total."""
        return cdiv(max(num_tokens, 0), self.block_size)

    def blocks_needed(self, seq: Sequence, num_tokens_total: int) -> int:
        """Extra blocks `seq` needs so its table covers `num_tokens_total` tokens (>= 0)."""
        return max(0, self.blocks_for_tokens(num_tokens_total) - len(seq.block_table))

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= len(self._free)

    def ensure_capacity(self, seq: Sequence, num_tokens_total: int) -> bool:
        """Grow `seq.block_table` to cover `num_tokens_total` tokens.

        Returns False, changing nothing, when not enough blocks are free.
        """
        needed = self.blocks_needed(seq, num_tokens_total)
        if needed > len(self._free):
            return False
        for _ in range(needed):
            block = self._free.pop()
            self._owner[block] = seq.seq_id
            seq.block_table.append(block)
        return True

    def free(self, seq: Sequence) -> None:
        """Return all of `seq`'s blocks to the pool and clear its table (a no-op when empty)."""
        for block in seq.block_table:
            if self._owner[block] != seq.seq_id:
                raise RuntimeError(f"block {block} in the table of sequence {seq.seq_id} is owned by "
                                   f"{self._owner[block]!r}; refusing to free it twice")
        for block in reversed(seq.block_table):
            self._owner[block] = None
            self._free.append(block)
        seq.block_table.clear()

    def check_invariants(self, seqs: Iterable[Sequence]) -> None:
        """Raise AssertionError unless every block is free or owned by exactly one of `seqs`.

        `seqs` must be every sequence that may hold blocks (e.g. all unfinished ones).
        """
        holder: dict[int, int] = {}
        for seq in seqs:
            for block in seq.block_table:
                if not 0 <= block < self.num_blocks:
                    raise AssertionError(f"sequence {seq.seq_id} holds out-of-range block {block}")
                if block in holder:
                    raise AssertionError(f"block {block} is held by sequences {holder[block]} and "
                                         f"{seq.seq_id}")
                holder[block] = seq.seq_id
        free = set(self._free)
        if len(free) != len(self._free):
            raise AssertionError("the free list holds a block twice")
        for block in range(self.num_blocks):
            owner = self._owner[block]
            if block in free:
                if owner is not None or block in holder:
                    raise AssertionError(f"block {block} is free but owned by "
                                         f"{owner if owner is not None else holder[block]}")
            elif owner is None or holder.get(block) != owner:
                raise AssertionError(f"block {block} is neither free nor held by its owner "
                                     f"(owner {owner}, held by {holder.get(block)})")

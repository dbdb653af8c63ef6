"""The KV block pool: which blocks each sequence owns, shared prefixes, freeing.

The pool is a fixed number of blocks of `block_size` token slots. A sequence holds a
block table (block ids, in order) and `num_cached_slots` filled slots; slot `i` of the
sequence lives in block `block_table[i // block_size]` at offset `i % block_size`.

Three operations exist for the later features that shrink or rewind a sequence:
- `truncate(seq, n)` drops every slot past the first n and frees blocks left empty:
  rejected speculative tokens roll back with it, and eviction calls it after the KV
  cache has moved the kept tokens to the front (compaction).
- full blocks are shared between sequences through chained content hashes (prefix
  caching) and reference counts; shared blocks are never written again.
- `free(seq)` returns everything at once (finish, abort, preemption).

A sequence may also hold side blocks outside its block table (`hold_side_blocks`): memory it
keeps elsewhere, such as MiKV's low-precision side store, charged to the pool in whole blocks so
that the pool stays the one KV memory budget. Nothing is written to them; `free` returns them too.
"""

from __future__ import annotations

from collections import OrderedDict

from thrifty.engine.sequence import Sequence


def chain_hash(previous: int | None, token_ids: tuple[int, ...]) -> int:
    """Hash of a full block that also covers every block before it."""
    return hash((previous, token_ids))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of at least one slot, got {num_blocks} x {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.hash_to_block: dict[int, int] = {}
        # Free blocks, least recently freed first; a free block may still hold a cached prefix
        # that a later request can claim until the block is handed out again.
        self.free_blocks: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        # Hashes of each sequence's committed full blocks, by sequence id.
        self.seq_block_hashes: dict[int, list[int]] = {}
        # Blocks each sequence holds outside its block table, by sequence id.
        self.side_blocks: dict[int, list[int]] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free_blocks)

    @property
    def num_side_blocks(self) -> int:
        """Blocks held outside block tables (included in num_used_blocks)."""
        return sum(len(blocks) for blocks in self.side_blocks.values())

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def blocks_for(self, num_slots: int) -> int:
        return -(-num_slots // self.block_size)

    # -- allocation -------------------------------------------------------------------------

    def claim_cached_prefix(self, seq: Sequence) -> int:
        """Give a new sequence the cached full blocks that match its first tokens.

        At least one token is always left to compute, since its logits are needed.
        Returns the number of tokens covered.
        """
        assert not seq.block_table, "prefix can only be claimed by a sequence without blocks"
        hashes: list[int] = []
        if self.enable_prefix_caching:
            previous = None
            for start in range(0, seq.num_tokens - 1 - self.block_size + 1, self.block_size):
                h = chain_hash(previous, tuple(seq.token_ids[start:start + self.block_size]))
                block = self.hash_to_block.get(h)
                if block is None:
                    break
                self._take(block)
                seq.block_table.append(block)
                hashes.append(h)
                previous = h
        self.seq_block_hashes[seq.seq_id] = hashes
        covered = len(hashes) * self.block_size
        seq.num_computed_tokens = seq.num_cached_slots = covered
        return covered

    def cached_prefix_blocks(self, seq: Sequence) -> int:
        """How many of a waiting sequence's full blocks are in the prefix cache (no side effects)."""
        if not self.enable_prefix_caching:
            return 0
        count, previous = 0, None
        for start in range(0, seq.num_tokens - 1 - self.block_size + 1, self.block_size):
            previous = chain_hash(previous, tuple(seq.token_ids[start:start + self.block_size]))
            if previous not in self.hash_to_block:
                break
            count += 1
        return count

    def new_blocks_needed(self, seq: Sequence, num_new_slots: int) -> int:
        return max(0, self.blocks_for(seq.num_cached_slots + num_new_slots) - len(seq.block_table))

    def can_append(self, seq: Sequence, num_new_slots: int) -> bool:
        return self.new_blocks_needed(seq, num_new_slots) <= self.num_free_blocks

    def append_slots(self, seq: Sequence, num_new_slots: int) -> list[int]:
        """Reserve `num_new_slots` slots after the sequence's last one; returns their flat ids."""
        needed = self.new_blocks_needed(seq, num_new_slots)
        if needed > self.num_free_blocks:
            raise RuntimeError(f"asked for {needed} blocks with {self.num_free_blocks} free; "
                               "the scheduler must check can_append first")
        for _ in range(needed):
            block, _ = self.free_blocks.popitem(last=False)
            self._forget_hash(block)
            self.ref_counts[block] = 1
            seq.block_table.append(block)
        start = seq.num_cached_slots
        seq.num_cached_slots += num_new_slots
        return self.slot_ids(seq, start, seq.num_cached_slots)

    def slot_ids(self, seq: Sequence, start: int, end: int) -> list[int]:
        bs, table = self.block_size, seq.block_table
        return [table[i // bs] * bs + i % bs for i in range(start, end)]

    # -- prefix cache -----------------------------------------------------------------------

    def commit(self, seq: Sequence) -> None:
        """Publish the sequence's newly completed full blocks to the prefix cache.

        Only valid while slot i holds token i (no eviction has happened), which is
        exactly when `num_cached_slots == num_computed_tokens`.
        """
        if not self.enable_prefix_caching or seq.num_cached_slots != seq.num_computed_tokens:
            return
        hashes = self.seq_block_hashes.setdefault(seq.seq_id, [])
        full_blocks = seq.num_computed_tokens // self.block_size
        while len(hashes) < full_blocks:
            i = len(hashes)
            h = chain_hash(hashes[-1] if hashes else None,
                           tuple(seq.token_ids[i * self.block_size:(i + 1) * self.block_size]))
            block = seq.block_table[i]
            if h not in self.hash_to_block:
                self.hash_to_block[h] = block
                self.block_hash[block] = h
            hashes.append(h)

    # -- shrinking --------------------------------------------------------------------------

    def truncate(self, seq: Sequence, num_slots: int) -> None:
        """Keep only the first `num_slots` slots and free the blocks left empty."""
        if num_slots > seq.num_cached_slots:
            raise ValueError(f"cannot truncate {seq.num_cached_slots} slots to {num_slots}")
        keep_blocks = self.blocks_for(num_slots)
        if num_slots % self.block_size and self.ref_counts[seq.block_table[keep_blocks - 1]] > 1:
            raise RuntimeError("truncating into a block shared with another sequence would corrupt it")
        for block in seq.block_table[keep_blocks:]:
            self._release(block)
        del seq.block_table[keep_blocks:]
        hashes = self.seq_block_hashes.get(seq.seq_id, [])
        del hashes[num_slots // self.block_size:]
        if num_slots % self.block_size:
            # The last kept block will be written again, so it can no longer serve as a cached prefix.
            self._forget_hash(seq.block_table[-1])
        seq.num_cached_slots = num_slots

    def shared_prefix_blocks(self, seq: Sequence) -> int:
        """How many of the sequence's leading blocks other sequences also hold."""
        count = 0
        while count < len(seq.block_table) and self.ref_counts[seq.block_table[count]] > 1:
            count += 1
        return count

    def can_compact(self, seq: Sequence, num_slots: int, keep_blocks: int = 0) -> bool:
        """Whether `compact` finds blocks for its copies (counting the blocks it frees)."""
        keep = self.blocks_for(num_slots)
        table = seq.block_table
        shared = sum(1 for b in table[keep_blocks:keep] if self.ref_counts[b] > 1)
        freed = sum(1 for b in table[keep:] if self.ref_counts[b] == 1)
        return shared <= self.num_free_blocks + freed

    def compact(self, seq: Sequence, num_slots: int, keep_blocks: int = 0) -> bool:
        """Make room for an eviction that rewrites slots [0, num_slots) in place and drops the rest.

        The first `keep_blocks` blocks stay exactly as they are (the caller will not write
        them). Blocks past `num_slots` are freed; any other kept block shared with another
        sequence is swapped for a fresh private one (copy-on-write, with nothing to copy: the
        caller rewrites every such slot); rewritten blocks leave the prefix cache, since their
        content changes. Returns False, changing nothing, when the fresh blocks cannot be had.
        """
        if num_slots > seq.num_cached_slots:
            raise ValueError(f"cannot compact {seq.num_cached_slots} slots to {num_slots}")
        if not self.can_compact(seq, num_slots, keep_blocks):
            return False
        keep = self.blocks_for(num_slots)
        table = seq.block_table
        shared = [i for i in range(keep_blocks, keep) if self.ref_counts[table[i]] > 1]
        for block in table[keep:]:
            self._release(block)
        del table[keep:]
        for i in range(keep_blocks, keep):
            if i in shared:
                fresh, _ = self.free_blocks.popitem(last=False)
                self._forget_hash(fresh)
                self.ref_counts[fresh] = 1
                self._release(table[i])
                table[i] = fresh
            else:
                self._forget_hash(table[i])
        del self.seq_block_hashes.setdefault(seq.seq_id, [])[keep_blocks:]
        seq.num_cached_slots = num_slots
        return True

    # -- side blocks ------------------------------------------------------------------------

    def num_side_blocks_of(self, seq: Sequence) -> int:
        return len(self.side_blocks.get(seq.seq_id, ()))

    def hold_side_blocks(self, seq: Sequence, count: int) -> bool:
        """Make the sequence hold exactly `count` side blocks, taking or returning the difference.

        Returns False, changing nothing, when the pool lacks the blocks to grow.
        """
        held = self.side_blocks.get(seq.seq_id, [])
        if count - len(held) > self.num_free_blocks:
            return False
        while len(held) < count:
            block, _ = self.free_blocks.popitem(last=False)
            self._forget_hash(block)  # it leaves the prefix cache like any block handed out
            self.ref_counts[block] = 1
            held.append(block)
        while len(held) > count:
            self._release(held.pop())
        if held:
            self.side_blocks[seq.seq_id] = held
        else:
            self.side_blocks.pop(seq.seq_id, None)
        return True

    def free(self, seq: Sequence) -> None:
        self.hold_side_blocks(seq, 0)
        for block in reversed(seq.block_table):
            self._release(block)
        seq.block_table = []
        seq.num_cached_slots = 0
        seq.num_computed_tokens = 0
        self.seq_block_hashes.pop(seq.seq_id, None)

    # -- internals --------------------------------------------------------------------------

    def _take(self, block: int) -> None:
        if self.ref_counts[block] == 0:
            del self.free_blocks[block]
        self.ref_counts[block] += 1

    def _release(self, block: int) -> None:
        self.ref_counts[block] -= 1
        assert self.ref_counts[block] >= 0, f"block {block} released more often than taken"
        if self.ref_counts[block] == 0:
            self.free_blocks[block] = None

    def _forget_hash(self, block: int) -> None:
        h = self.block_hash[block]
        if h is not None:
            if self.hash_to_block.get(h) == block:
                del self.hash_to_block[h]
            self.block_hash[block] = None

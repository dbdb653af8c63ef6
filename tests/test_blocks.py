"""Block pool: allocation, prefix sharing, truncation (rollback / eviction), freeing."""

import pytest
from hypothesis import given, settings, strategies as st

from thrifty.engine.sampling_params import SamplingParams
from thrifty.engine.sequence import Sequence
from thrifty.kv.blocks import BlockManager


def make_seq(tokens: list[int]) -> Sequence:
    return Sequence("r", 0, tokens, SamplingParams())


def test_append_slots_maps_slots_through_the_block_table():
    bm = BlockManager(num_blocks=8, block_size=4)
    seq = make_seq(list(range(10)))
    slots = bm.append_slots(seq, 10)
    assert len(seq.block_table) == 3
    assert bm.num_free_blocks == 5
    expected = [seq.block_table[i // 4] * 4 + i % 4 for i in range(10)]
    assert slots == expected
    # Two more slots fit in the third block, a third needs a new one.
    assert bm.new_blocks_needed(seq, 2) == 0
    assert bm.new_blocks_needed(seq, 3) == 1


def test_append_refuses_to_overcommit():
    bm = BlockManager(num_blocks=2, block_size=4)
    seq = make_seq(list(range(9)))
    assert not bm.can_append(seq, 9)
    with pytest.raises(RuntimeError):
        bm.append_slots(seq, 9)
    assert bm.num_free_blocks == 2 and seq.block_table == []


def test_prefix_cache_shares_full_blocks_and_leaves_one_token_to_compute():
    bm = BlockManager(num_blocks=16, block_size=4)
    first = make_seq(list(range(12)))
    bm.append_slots(first, 12)
    first.num_computed_tokens = 12
    bm.commit(first)
    second = make_seq(list(range(12)) + [99])
    covered = bm.claim_cached_prefix(second)
    assert covered == 12
    assert second.block_table == first.block_table
    assert all(bm.ref_counts[b] == 2 for b in first.block_table)
    # An identical prompt must still compute its last token: only 2 of its 3 blocks are claimed.
    third = make_seq(list(range(12)))
    assert bm.claim_cached_prefix(third) == 8
    # A different first block shares nothing, since hashes chain.
    fourth = make_seq([7] + list(range(1, 12)) + [5])
    assert bm.claim_cached_prefix(fourth) == 0


def test_freed_blocks_stay_claimable_until_reused():
    bm = BlockManager(num_blocks=4, block_size=2)
    seq = make_seq([1, 2, 3, 4, 5])
    bm.append_slots(seq, 5)
    seq.num_computed_tokens = 5
    bm.commit(seq)
    bm.free(seq)
    assert bm.num_free_blocks == 4
    again = make_seq([1, 2, 3, 4, 5])
    assert bm.claim_cached_prefix(again) == 4
    assert bm.num_free_blocks == 2
    bm.free(again)
    # Handing the blocks out to other content drops their cached identity.
    other = make_seq(list(range(100, 108)))
    bm.append_slots(other, 8)
    assert bm.claim_cached_prefix(make_seq([1, 2, 3, 4, 5])) == 0


def test_truncate_rolls_back_and_frees_empty_blocks():
    bm = BlockManager(num_blocks=8, block_size=4)
    seq = make_seq(list(range(13)))
    bm.append_slots(seq, 13)
    assert len(seq.block_table) == 4
    bm.truncate(seq, 6)
    assert seq.num_cached_slots == 6
    assert len(seq.block_table) == 2
    assert bm.num_free_blocks == 6
    # Refilling after a rollback reuses the partly filled block first.
    slots = bm.append_slots(seq, 2)
    assert slots == [seq.block_table[1] * 4 + 2, seq.block_table[1] * 4 + 3]


def test_truncate_refuses_to_cut_into_a_shared_block():
    bm = BlockManager(num_blocks=8, block_size=4)
    first = make_seq(list(range(9)))
    bm.append_slots(first, 9)
    first.num_computed_tokens = 9
    bm.commit(first)
    second = make_seq(list(range(9)))
    bm.claim_cached_prefix(second)
    bm.append_slots(second, 1)
    with pytest.raises(RuntimeError):
        bm.truncate(second, 6)
    bm.truncate(second, 8)  # a whole shared block may be kept
    assert bm.ref_counts[first.block_table[0]] == 2


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["append", "truncate", "free"]), st.integers(0, 20)), max_size=40))
def test_block_accounting_never_leaks(operations):
    """Whatever happens, used + free blocks add up and every block table entry is owned."""
    bm = BlockManager(num_blocks=12, block_size=4, enable_prefix_caching=False)
    seqs = [make_seq([1] * 4) for _ in range(3)]
    for i, (op, amount) in enumerate(operations):
        seq = seqs[i % 3]
        if op == "append" and bm.can_append(seq, amount):
            bm.append_slots(seq, amount)
        elif op == "truncate":
            bm.truncate(seq, min(amount, seq.num_cached_slots))
        elif op == "free":
            bm.free(seq)
        owned = [b for s in seqs for b in s.block_table]
        assert len(owned) == len(set(owned))
        assert len(owned) + bm.num_free_blocks == bm.num_blocks
        for s in seqs:
            assert len(s.block_table) == bm.blocks_for(s.num_cached_slots)
    for s in seqs:
        bm.free(s)
    assert bm.num_free_blocks == bm.num_blocks

"""The batched decode attention path equals the per-sequence path it replaces."""

import pytest
import torch

from thrifty.models.paged_attention import AttentionMetadata, SequenceSlice, paged_attention

H, KVH, D, SLOTS = 4, 2, 8, 256


def per_sequence(q, k, v, k_cache, v_cache, meta, **kw):
    """Each sequence attended on its own (a one-sequence batch never takes the batched path)."""
    out = torch.empty_like(q)
    for seq in meta.sequences:
        rows = slice(seq.query_start, seq.query_start + seq.query_len)
        alone = AttentionMetadata(slot_mapping=meta.slot_mapping[rows],
                                  sequences=[SequenceSlice(0, seq.query_len, seq.context_len, seq.slot_ids,
                                                           seq.tree_mask, seq.observer)])
        out[rows] = paged_attention(q[rows], k[rows], v[rows], k_cache, v_cache, alone, **kw)
    return out


def batch(query_lens, context_lens, seed=0):
    g = torch.Generator().manual_seed(seed)
    free = torch.randperm(SLOTS, generator=g)
    sequences, new_slots, start, used = [], [], 0, 0
    for qlen, ctx in zip(query_lens, context_lens):
        slots = free[used:used + ctx]
        used += ctx
        sequences.append(SequenceSlice(start, qlen, ctx, slots))
        new_slots.append(slots[-qlen:])
        start += qlen
    t = start
    q, k, v = (torch.randn(t, h, D, generator=g) for h in (H, KVH, KVH))
    k_cache, v_cache = torch.randn(SLOTS, KVH, D, generator=g), torch.randn(SLOTS, KVH, D, generator=g)
    return q, k, v, k_cache, v_cache, AttentionMetadata(torch.cat(new_slots), sequences)


@pytest.mark.parametrize("window", [None, 5])
def test_batched_decode_equals_per_sequence(window):
    # Decodes of different context lengths, mixed with a prefill chunk and a tree-masked sequence.
    q, k, v, k_cache, v_cache, meta = batch([1, 1, 6, 1, 3], [9, 30, 12, 2, 20])
    meta.sequences[4].tree_mask = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 0, 1]], dtype=torch.bool)
    assert meta.decode is not None and meta.decode.indices == {0, 1, 3}
    kw = dict(scale=0.3, layer=0, sliding_window=window)
    expected = per_sequence(q, k, v, k_cache.clone(), v_cache.clone(), meta, **kw)
    out = paged_attention(q, k, v, k_cache, v_cache, meta, **kw)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_observed_sequences_keep_the_per_sequence_path():
    q, k, v, k_cache, v_cache, meta = batch([1, 1, 1], [4, 7, 5], seed=1)
    seen = []
    meta.sequences[1].observer = lambda layer, probs: seen.append(probs.shape)
    assert meta.decode.indices == {0, 2}
    paged_attention(q, k, v, k_cache, v_cache, meta, scale=0.3, layer=0)
    assert seen == [(H, 1, 7)]

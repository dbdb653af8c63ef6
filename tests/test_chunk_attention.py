"""bfloat16 attention of long chunks (prefill) on hand-made tensors, and where the model uses it."""

import pytest
import torch
import torch.nn.functional as F

from thrifty.models import chunk_attention
from thrifty.models.chunk_attention import bf16_chunk_attention
from thrifty.models.paged_attention import (
    AttentionMetadata,
    SequenceSlice,
    paged_attention,
)

H, KVH, D = 6, 2, 32
SCALE = D ** -0.5
# On unit-variance inputs the largest error is about 7e-3 (PyTorch's own SDPA on bfloat16 inputs: 2.5e-3).
TOLERANCE = 2e-2


def tensors(queries: int, context: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(H, queries, D, generator=g)
    k = torch.randn(KVH, context, D, generator=g)
    v = torch.randn(KVH, context, D, generator=g)
    return q, k, v


def reference(q, k, v, allowed):
    """float64 SDPA on the same inputs (enable_gqa: query head h reads kv head h // (H // KVH))."""
    return F.scaled_dot_product_attention(q[None].double(), k[None].double(), v[None].double(), attn_mask=allowed,
                                          scale=SCALE, enable_gqa=True)[0]


def masks(queries: int, context: int) -> dict[str, torch.Tensor | None]:
    query_pos = torch.arange(context - queries, context)[:, None]
    key_pos = torch.arange(context)[None, :]
    causal = key_pos <= query_pos
    holes = causal.clone()
    holes[:, 50:200] = False  # a layer that evicted slots in the middle (per-layer KV budgets)
    return {"causal": causal, "sliding window": causal & (key_pos > query_pos - 100), "holes": holes,
            "all visible": None}


@pytest.mark.parametrize("kind", ["causal", "sliding window", "holes", "all visible"])
@pytest.mark.parametrize("queries,context", [(300, 300), (300, 700), (128, 129)])
def test_matches_float64_attention_under_every_mask(kind, queries, context):
    q, k, v = tensors(queries, context)
    allowed = masks(queries, context)[kind]
    out = bf16_chunk_attention(q, k, v, allowed, SCALE)
    assert out.shape == q.shape and out.dtype == q.dtype
    expected = reference(q, k, v, allowed)
    error = (out.double() - expected).abs().max().item()
    assert error < TOLERANCE
    if allowed is not None:  # the tolerance tells masks apart: ignoring this one would exceed it by far
        assert (reference(q, k, v, None) - expected).abs().max().item() > 10 * TOLERANCE


def test_blocks_skip_only_keys_no_row_of_them_may_see():
    """A query block multiplies just its visible key range; the result equals attending to all keys."""
    q, k, v = tensors(256, 600, seed=3)
    allowed = masks(256, 600)["sliding window"]
    out = bf16_chunk_attention(q, k, v, allowed, SCALE)
    for row in (0, 127, 128, 255):  # first and last rows of both blocks, one query at a time over every key
        alone = bf16_chunk_attention(q[:, row:row + 1], k, v, allowed[row:row + 1], SCALE)
        torch.testing.assert_close(out[:, row], alone[:, 0], rtol=0, atol=1e-2)


def test_matmul_shapes_do_not_follow_the_prompt_length(monkeypatch):
    """oneDNN keeps a primitive per matmul shape for good: every prompt length must map onto a few."""
    shapes = set()
    bmm = torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda a, b, **kw: shapes.add((tuple(a.shape), tuple(b.shape))) or bmm(a, b, **kw))
    for queries in range(128, 420, 7):  # 42 prompt lengths, each a whole causal prefill
        q, k, v = tensors(queries, queries)
        bf16_chunk_attention(q, k, v, masks(queries, queries)["causal"], SCALE)
    rows = (H // KVH) * chunk_attention._BLOCK_ROWS  # a block's query rows, all query heads of a KV head
    for a, b in shapes:  # scores: [KVH, rows, D] x [KVH, D, width]; values: [KVH, rows, width] x [KVH, width, D]
        width = b[2] if b[1] == D else a[2]
        assert a[1] == rows and width % chunk_attention._KEY_COLUMNS == 0
    assert len(shapes) == 2 * 4  # widths 128, 256, 384, 512, two products each


def paged_inputs(long_len: int, cached: int):
    """Two sequences in one step: a prefill chunk of `long_len` tokens after `cached` ones, and a decode."""
    g = torch.Generator().manual_seed(7)
    slots = 1024
    k_cache, v_cache = torch.randn(slots, KVH, D, generator=g), torch.randn(slots, KVH, D, generator=g)
    long_slots = torch.arange(cached + long_len)
    decode_slots = torch.arange(600, 650)
    q = torch.randn(long_len + 1, H, D, generator=g)
    k, v = torch.randn(long_len + 1, KVH, D, generator=g), torch.randn(long_len + 1, KVH, D, generator=g)
    meta = AttentionMetadata(
        slot_mapping=torch.cat((long_slots[cached:], decode_slots[-1:])),
        sequences=[SequenceSlice(0, long_len, cached + long_len, long_slots),
                   SequenceSlice(long_len, 1, len(decode_slots), decode_slots)])
    return q, k, v, k_cache, v_cache, meta


def test_paged_attention_takes_it_for_long_chunks_only():
    long_len = chunk_attention.MIN_QUERIES + 5
    results = {}
    for bf16 in (False, True):
        q, k, v, k_cache, v_cache, meta = paged_inputs(long_len, cached=40)
        results[bf16] = paged_attention(q, k, v, k_cache, v_cache, meta, scale=SCALE, layer=0, bf16_chunks=bf16)
    # The decode row keeps float32 attention, bit for bit.
    assert torch.equal(results[True][long_len:], results[False][long_len:])
    # The chunk is what the bfloat16 path computes on its gathered cache, close to float32.
    q, k, v, k_cache, v_cache, meta = paged_inputs(long_len, cached=40)
    paged_attention(q, k, v, k_cache, v_cache, meta, scale=SCALE, layer=0)  # writes this step's K/V
    seq = meta.sequences[0]
    keys, values = k_cache[seq.slot_ids].transpose(0, 1), v_cache[seq.slot_ids].transpose(0, 1)
    causal = torch.arange(seq.context_len)[None, :] <= torch.arange(40, seq.context_len)[:, None]
    direct = bf16_chunk_attention(q[:long_len].transpose(0, 1), keys, values, causal, SCALE).transpose(0, 1)
    assert torch.equal(results[True][:long_len], direct)
    torch.testing.assert_close(results[True][:long_len], results[False][:long_len], rtol=0, atol=TOLERANCE)


def test_packed_weights_turn_it_on_where_the_cpu_multiplies_bfloat16(tiny_llama_gguf, monkeypatch):
    from thrifty import LLM
    from thrifty.models.layers import Attention
    from thrifty.quant import convert

    for has_bf16 in (True, False):
        monkeypatch.setattr(convert, "cpu_has_bf16", lambda has=has_bf16: has)
        for weights, expected in (("fp32", False), ("int8", has_bf16)):
            llm = LLM(str(tiny_llama_gguf), weights=weights, kv_cache_tokens=256, block_size=4)
            layers = [m for m in llm.engine.model.modules() if isinstance(m, Attention)]
            assert layers and all(m.bf16_chunks == expected for m in layers), (weights, has_bf16)

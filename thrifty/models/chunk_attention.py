"""Attention of a long chunk of new tokens (a prefill chunk) in bfloat16 matmuls.

PyTorch's fused CPU attention runs its products in float32 even for bfloat16 inputs unless the
CPU has AMX, so it stops at the float32 matmul peak: 17-22 ms for a 512-token chunk over a 2048-token
cache of SmolLM2-135M, 44% of a 2k-token prefill. On a CPU with AVX-512 BF16 a bfloat16 batched
matmul runs about 6x faster than float32, so here the scores and the weighted sum of values are
bfloat16 matmuls (float32 accumulation inside), with a float32 softmax in between. The queries are
taken a block of rows at a time, so the scores stay a few MB, and each block multiplies only the
keys it may see: a causal chunk skips the keys past its last row (a fifth of the work for 4 chunks).

This is as precise as the bfloat16 activations the packed weight formats already run, so it is used
only with them (`Attention.bf16_chunks`); the float32 reference and short steps (decode, speculative
verification) keep float32 attention.
"""

from __future__ import annotations

import math

import torch

# Chunks of at least this many new tokens take this path; shorter ones (decode steps, speculative
# trees) keep float32 attention, whose numerics they share with plain decoding.
MIN_QUERIES = 128
_BLOCK_ROWS = 128  # query rows per block: [kv_heads, group * 128, context] scores, 4.7 MB at 2048


def bf16_chunk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor | None,
                         scale: float) -> torch.Tensor:
    """softmax(q k^T * scale, masked) v with grouped-query heads.

    q: [heads, queries, dim]; k, v: [kv_heads, context, dim]; allowed: bool [queries, context] (None:
    every key visible to every query; every query must see at least one key). Returns q's shape and dtype.
    """
    heads, queries, dim = q.shape
    kv_heads = k.shape[0]
    group = heads // kv_heads  # query head h reads kv head h // group, as SDPA's enable_gqa
    grouped = (q * scale).to(torch.bfloat16).view(kv_heads, group, queries, dim)
    # Contiguous: the caller's [kv_heads, context, dim] is a transposed view, which oneDNN's batched
    # matmul multiplies up to 4x slower at some lengths.
    keys = k.to(torch.bfloat16, memory_format=torch.contiguous_format)
    values = v.to(torch.bfloat16, memory_format=torch.contiguous_format)
    out = torch.empty(kv_heads, group, queries, dim, dtype=q.dtype, device=q.device)
    # Every block's scores and probabilities go into two buffers sized for the widest block: tensors of
    # ever-changing sizes, allocated anew per block, fragmented the heap (about 10 MB more peak RSS
    # in `bench speed`).
    most = kv_heads * group * min(_BLOCK_ROWS, queries) * k.shape[1]
    scores_buffer = torch.empty(most, dtype=torch.bfloat16, device=q.device)
    probs_buffer = torch.empty(most, dtype=torch.bfloat16, device=q.device)
    for start in range(0, queries, _BLOCK_ROWS):
        rows = min(_BLOCK_ROWS, queries - start)
        first, last, partial, mask = 0, k.shape[1], None, None
        if allowed is not None:
            mask = allowed[start:start + rows]
            as_bytes = mask.view(torch.uint8)  # uint8 column reductions run ~20x faster than bool any/all
            visible = as_bytes.amax(dim=0).nonzero()
            first, last = int(visible[0]), int(visible[-1]) + 1
            mask = mask[:, first:last]
            hidden_somewhere = (as_bytes[:, first:last].amin(dim=0) == 0).nonzero()
            partial = int(hidden_somewhere[0]) if len(hidden_somewhere) else None
        block = grouped[:, :, start:start + rows].reshape(kv_heads, group * rows, dim)
        shape = (kv_heads, group * rows, last - first)
        scores = torch.bmm(block, keys[:, first:last].transpose(1, 2), out=scores_buffer[:math.prod(shape)].view(shape))
        if partial is not None and mask is not None:  # only the columns some row may not see
            scores.view(kv_heads, group, rows, last - first)[..., partial:].masked_fill_(
                ~mask[:, partial:], float("-inf"))
        probs = torch.ops.aten._softmax.out(scores, -1, False, out=probs_buffer[:math.prod(shape)].view(shape))
        out[:, :, start:start + rows] = torch.bmm(probs, values[:, first:last]).view(kv_heads, group, rows, dim)
    return out.view(heads, queries, dim)

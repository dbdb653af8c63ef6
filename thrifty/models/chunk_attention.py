"""Attention of a long chunk of new tokens (a prefill chunk) in bfloat16 matmuls.

PyTorch's fused CPU attention runs its products in float32 even for bfloat16 inputs unless the
CPU has AMX, so it stops at the float32 matmul peak: 17-22 ms for a 512-token chunk over a 2048-token
cache of SmolLM2-135M, 44% of a 2k-token prefill. On a CPU with AVX-512 BF16 a bfloat16 batched
matmul runs about 6x faster than float32, so here the scores and the weighted sum of values are
bfloat16 matmuls (float32 accumulation inside), with a softmax in between. The queries are
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
# Key ranges are widened to multiples of this many columns (the extra ones masked). oneDNN keeps a
# compiled primitive (about 0.6 MB) per distinct matmul shape for the life of the process: exact
# ranges gave every new prompt length new shapes, and a server's RSS grew by ~3 MB a prompt.
_KEY_COLUMNS = 128


def bf16_chunk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor | None,
                         scale: float) -> torch.Tensor:
    """softmax(q k^T * scale, masked) v with grouped-query heads.

    q: [heads, queries, dim]; k, v: [kv_heads, context, dim]; allowed: bool [queries, context] (None:
    every key visible to every query; every query must see at least one key). Returns q's shape and dtype.
    """
    heads, queries, dim = q.shape
    kv_heads, context = k.shape[0], k.shape[1]
    group = heads // kv_heads  # query head h reads kv head h // group, as SDPA's enable_gqa
    grouped = (q * scale).to(torch.bfloat16).view(kv_heads, group, queries, dim)
    # Contiguous bfloat16 copies, zero-padded to whole column groups: the caller's [kv_heads, context,
    # dim] is a transposed view, which oneDNN's batched matmul multiplies up to 4x slower at some lengths.
    padded = -(-context // _KEY_COLUMNS) * _KEY_COLUMNS
    keys = k.new_zeros(kv_heads, padded, dim, dtype=torch.bfloat16)
    values = v.new_zeros(kv_heads, padded, dim, dtype=torch.bfloat16)
    keys[:, :context], values[:, :context] = k, v
    out = torch.empty(kv_heads, group, queries, dim, dtype=q.dtype, device=q.device)
    # Every block's scores and probabilities go into two buffers sized for the widest block: tensors of
    # ever-changing sizes, allocated anew per block, fragmented the heap (about 10 MB more peak RSS
    # in `bench speed`).
    rows = min(_BLOCK_ROWS, queries)
    most = kv_heads * group * rows * padded
    scores_buffer = torch.empty(most, dtype=torch.bfloat16, device=q.device)
    probs_buffer = torch.empty(most, dtype=torch.bfloat16, device=q.device)
    # Every block has the full number of rows: a last, shorter one moves back to overlap the one
    # before it (those rows are computed twice) rather than bring a new shape.
    starts = list(range(0, queries - rows + 1, rows))
    if starts[-1] + rows < queries:
        starts.append(queries - rows)
    for start in starts:
        first, last, mask = 0, context, None
        if allowed is not None:
            mask = allowed[start:start + rows]
            visible = mask.view(torch.uint8).amax(dim=0).nonzero()  # uint8 reductions: ~20x bool any/all
            first, last = int(visible[0]), int(visible[-1]) + 1
        first, last = first // _KEY_COLUMNS * _KEY_COLUMNS, -(-last // _KEY_COLUMNS) * _KEY_COLUMNS
        shape = (kv_heads, group * rows, last - first)
        block = grouped[:, :, start:start + rows].reshape(kv_heads, group * rows, dim)
        scores = torch.bmm(block, keys[:, first:last].transpose(1, 2), out=scores_buffer[:math.prod(shape)].view(shape))
        by_row = scores.view(kv_heads, group, rows, last - first)
        real = min(last, context) - first  # columns past the cache are padding, hidden from every row
        by_row[..., real:] = float("-inf")
        if mask is not None:
            # Only from the first column some row may not see: a causal block's early keys are visible to all.
            hidden_somewhere = (mask[:, first:first + real].view(torch.uint8).amin(dim=0) == 0).nonzero()
            if len(hidden_somewhere):
                partial = int(hidden_somewhere[0])
                by_row[..., partial:real].masked_fill_(~mask[:, first + partial:first + real], float("-inf"))
        probs = torch.ops.aten._softmax.out(scores, -1, False, out=probs_buffer[:math.prod(shape)].view(shape))
        out[:, :, start:start + rows] = torch.bmm(probs, values[:, first:last]).view(kv_heads, group, rows, dim)
    return out.view(heads, queries, dim)

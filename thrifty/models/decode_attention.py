"""Attention for a decoding step: Q new tokens per sequence after its cache, nothing else asked of attention.

Q is 1 in plain decoding and 1 + k when every sequence of the step verifies a chain draft of k tokens
(or a model drafter reads the last accepted tokens); each new token sees its sequence's cache and the
new tokens before it. Such a step (no prefill chunk, draft tree, attention observer, per-layer lengths
or demoted tokens) needs only a few tensors, built once per step by the model runner: where each new
token's K/V goes, each sequence's cache slots padded to the longest, and which slots each new token
may see. Every layer then runs the same few tensor ops, with no per-sequence Python, which is both
cheaper in eager mode and what torch.export can trace into one compiled graph whose context length
is a dynamic dimension (thrifty.engine.compiled_decode).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from thrifty.kv.quant.base import LayerKV


@dataclass
class DecodeMetadata:
    """The tensors attention needs for a step of B sequences with Q new tokens each (B * Q rows, sequence-major)."""

    slot_mapping: torch.Tensor  # int64 [B * Q]: where each new token's K/V goes (its sequence's last Q slots)
    slot_ids: torch.Tensor  # int64 [B, max_context]: each sequence's cache slots, oldest first, padded
    query_slots: torch.Tensor  # int64 [B, Q]: each new token's index among its sequence's slots (oldest 0)
    # bool [B, Q, max_context], the slots each new token may see (its sequence's, up to itself); None
    # when every slot is visible (one sequence, one new token)
    allowed: torch.Tensor | None

    @classmethod
    def build(cls, block_tables: list[list[int]], context_lens: list[int], block_size: int,
              device: torch.device, query_len: int = 1) -> DecodeMetadata:
        longest = max(context_lens)
        width = -(-longest // block_size)
        tables = torch.tensor([t[:width] + [0] * (width - len(t[:width])) for t in block_tables],
                              dtype=torch.long, device=device)
        offsets = torch.arange(block_size, device=device)
        # Contiguous whatever the length, so a compiled graph meets one memory layout, not two.
        slot_ids = (tables[:, :, None] * block_size + offsets).flatten(1)[:, :longest].contiguous()
        lens = torch.tensor(context_lens, dtype=torch.long, device=device)[:, None]
        query_slots = lens - query_len + torch.arange(query_len, device=device)  # [B, Q]
        allowed = None
        if len(context_lens) > 1 or query_len > 1:  # slots past a shorter sequence's end belong to another or to none
            allowed = torch.arange(longest, device=device) <= query_slots[:, :, None]
        return cls(slot_ids.gather(1, query_slots).flatten(), slot_ids, query_slots, allowed)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     k_cache: torch.Tensor | LayerKV, v_cache: torch.Tensor | LayerKV, meta: DecodeMetadata, *,
                     scale: float, sliding_window: int | None = None) -> torch.Tensor:
    """Write k, v ([B * Q, num_kv_heads, head_dim]) into the cache, then attend each query
    ([B * Q, num_heads, head_dim]) to the slots it may see in one SDPA call. Returns [B * Q, num_heads, head_dim]."""
    batch, heads, head_dim = meta.slot_ids.shape[0], q.shape[1], q.shape[2]
    query_len = q.shape[0] // batch
    if isinstance(k_cache, LayerKV):
        k_cache.write(meta.slot_mapping, k, v)
        ks, vs = k_cache.gather(meta.slot_ids, q.dtype)  # [B, ctx, KVH, D]
        # Each new token as computed, not as stored (a quantized store rounds it), at its slot.
        rows = torch.arange(batch, device=q.device)[:, None]
        ks[rows, meta.query_slots] = k.view(batch, query_len, *k.shape[1:]).to(q.dtype)
        vs[rows, meta.query_slots] = v.view(batch, query_len, *v.shape[1:]).to(q.dtype)
    else:
        k_cache.index_copy_(0, meta.slot_mapping, k.to(k_cache.dtype))
        v_cache.index_copy_(0, meta.slot_mapping, v.to(v_cache.dtype))
        # index_select on the flat slot ids: 4x cheaper than advanced indexing by a 2-D index.
        flat, shape = meta.slot_ids.reshape(-1), (*meta.slot_ids.shape, *k_cache.shape[1:])
        ks = k_cache.index_select(0, flat).view(shape).to(q.dtype)
        vs = v_cache.index_select(0, flat).view(shape).to(q.dtype)
    allowed = meta.allowed
    if sliding_window is not None:
        slots = torch.arange(meta.slot_ids.shape[1], device=q.device)
        in_window = slots > meta.query_slots[:, :, None] - sliding_window
        allowed = in_window if allowed is None else allowed & in_window
    mask = None if allowed is None else allowed[:, None]  # [B, 1, Q, ctx]
    queries = q.view(batch, query_len, heads, head_dim).transpose(1, 2)  # [B, H, Q, D]
    attended = F.scaled_dot_product_attention(queries, ks.permute(0, 2, 1, 3), vs.permute(0, 2, 1, 3),
                                              attn_mask=mask, scale=scale, enable_gqa=True)
    return attended.transpose(1, 2).reshape(batch * query_len, heads, head_dim)

"""Attention for a plain decoding step: one new token per sequence, nothing else asked of attention.

Such a step (no prefill chunk, draft tree, attention observer, per-layer lengths or demoted tokens)
needs only a few tensors, built once per step by the model runner: where each new token's K/V
goes, and each sequence's cache slots padded to the longest. Every layer then runs the same few
tensor ops, with no per-sequence Python, which is both cheaper in eager mode and what
torch.compile can trace into one graph whose context length is a dynamic dimension.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from thrifty.kv.quant.base import LayerKV


@dataclass
class DecodeMetadata:
    """The tensors attention needs for a step of B single-token sequences."""

    slot_mapping: torch.Tensor  # int64 [B]: where each new token's K/V goes (its last cache slot)
    slot_ids: torch.Tensor  # int64 [B, max_context]: each sequence's cache slots, oldest first, padded
    context_lens: torch.Tensor  # int64 [B, 1]: cached slots of each sequence after this step's write
    # bool [B, max_context], which padded slots are real; None when every slot is (a single sequence)
    valid: torch.Tensor | None

    @classmethod
    def build(cls, block_tables: list[list[int]], context_lens: list[int], block_size: int,
              device: torch.device) -> DecodeMetadata:
        longest = max(context_lens)
        width = -(-longest // block_size)
        tables = torch.tensor([t[:width] + [0] * (width - len(t[:width])) for t in block_tables],
                              dtype=torch.long, device=device)
        offsets = torch.arange(block_size, device=device)
        # Contiguous whatever the length, so a compiled graph meets one memory layout, not two.
        slot_ids = (tables[:, :, None] * block_size + offsets).flatten(1)[:, :longest].contiguous()
        last = [t[(n - 1) // block_size] * block_size + (n - 1) % block_size
                for t, n in zip(block_tables, context_lens)]
        lens = torch.tensor(context_lens, dtype=torch.long, device=device)[:, None]
        valid = None
        if len(context_lens) > 1:  # slots past a shorter sequence's end belong to another or to none
            valid = torch.arange(longest, device=device)[None, :] < lens
        return cls(torch.tensor(last, dtype=torch.long, device=device), slot_ids, lens, valid)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     k_cache: torch.Tensor | LayerKV, v_cache: torch.Tensor | LayerKV, meta: DecodeMetadata, *,
                     scale: float, sliding_window: int | None = None) -> torch.Tensor:
    """Write k, v ([B, num_kv_heads, head_dim]) into the cache, then attend each query
    ([B, num_heads, head_dim]) to its sequence's slots in one SDPA call. Returns [B, num_heads, head_dim]."""
    if isinstance(k_cache, LayerKV):
        k_cache.write(meta.slot_mapping, k, v)
        ks, vs = k_cache.gather(meta.slot_ids, q.dtype)  # [B, ctx, KVH, D]
        # Each new token as computed, not as stored (a quantized store rounds it), at its last slot.
        batch = torch.arange(q.shape[0], device=q.device)
        last = meta.context_lens[:, 0] - 1
        ks[batch, last] = k.to(q.dtype)
        vs[batch, last] = v.to(q.dtype)
    else:
        k_cache.index_copy_(0, meta.slot_mapping, k.to(k_cache.dtype))
        v_cache.index_copy_(0, meta.slot_mapping, v.to(v_cache.dtype))
        # index_select on the flat slot ids: 4x cheaper than advanced indexing by a 2-D index.
        flat, shape = meta.slot_ids.reshape(-1), (*meta.slot_ids.shape, *k_cache.shape[1:])
        ks = k_cache.index_select(0, flat).view(shape).to(q.dtype)
        vs = v_cache.index_select(0, flat).view(shape).to(q.dtype)
    allowed = meta.valid
    if sliding_window is not None:
        slots = torch.arange(meta.slot_ids.shape[1], device=q.device)[None, :]
        in_window = slots >= meta.context_lens - sliding_window
        allowed = in_window if allowed is None else allowed & in_window
    mask = None if allowed is None else allowed[:, None, None, :]
    attended = F.scaled_dot_product_attention(q[:, :, None, :], ks.permute(0, 2, 1, 3), vs.permute(0, 2, 1, 3),
                                              attn_mask=mask, scale=scale, enable_gqa=True)
    return attended[:, :, 0, :]

"""Attention over the paged KV cache.

The KV cache of one layer is a pair of tensors of shape
`[num_blocks * block_size, num_kv_heads, head_dim]` (flat "slots"). A sequence owns
a list of blocks (its block table); its cached tokens live in the slots of those
blocks, in order. The model runner turns block tables into `slot_ids` once per step
so each layer only gathers.

Keys are stored after RoPE, so a cached token carries its position with it and the
cache may later be compacted (eviction) without touching the keys. Within a
sequence the new tokens of this step always occupy the last `query_len` of its
`context_len` slots.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class SequenceSlice:
    """One sequence's share of a batched step."""

    query_start: int  # first row of this sequence in the flat batch of new tokens
    query_len: int  # number of new tokens this step
    context_len: int  # cached slots of this sequence after this step's writes
    slot_ids: torch.Tensor  # int64 [context_len]: flat cache slots, oldest first


@dataclass
class AttentionMetadata:
    """Everything attention needs about the batch, built once per step by the model runner."""

    slot_mapping: torch.Tensor  # int64 [num_new_tokens]: where each new token's K/V goes
    sequences: list[SequenceSlice]


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Store this step's keys and values ([T, kv_heads, head_dim]) in their slots."""
    k_cache.index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def _allowed_keys(query_len: int, context_len: int, sliding_window: int | None,
                  device: torch.device) -> torch.Tensor | None:
    """Boolean [query_len, context_len] mask: causal, and banded for sliding-window layers."""
    if query_len == 1 and (sliding_window is None or context_len <= sliding_window):
        return None  # a single new token may see every cached slot
    query_slots = torch.arange(context_len - query_len, context_len, device=device)[:, None]
    key_slots = torch.arange(context_len, device=device)[None, :]
    allowed = key_slots <= query_slots
    if sliding_window is not None:
        allowed &= key_slots > query_slots - sliding_window
    return allowed


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, *,
                    scale: float, sliding_window: int | None = None,
                    softcap: float | None = None) -> torch.Tensor:
    """Write k, v into the cache, then attend every new query to its sequence's cache.

    q: [T, num_heads, head_dim]; k, v: [T, num_kv_heads, head_dim]. Returns [T, num_heads, head_dim].
    """
    write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
    out = torch.empty_like(q)
    for seq in meta.sequences:
        rows = slice(seq.query_start, seq.query_start + seq.query_len)
        qs = q[rows].transpose(0, 1)  # [H, q, D]
        ks = k_cache[seq.slot_ids].transpose(0, 1).to(q.dtype)  # [KVH, ctx, D]
        vs = v_cache[seq.slot_ids].transpose(0, 1).to(q.dtype)
        allowed = _allowed_keys(seq.query_len, seq.context_len, sliding_window, q.device)
        if softcap is None:
            attended = F.scaled_dot_product_attention(
                qs, ks, vs, attn_mask=allowed, scale=scale, enable_gqa=True)
        else:
            attended = _softcapped_attention(qs, ks, vs, allowed, scale, softcap)
        out[rows] = attended.transpose(0, 1)
    return out


def _softcapped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          allowed: torch.Tensor | None, scale: float, softcap: float) -> torch.Tensor:
    """Attention with tanh soft-capping of the logits (Gemma 2 style), which SDPA lacks."""
    group = q.shape[0] // k.shape[0]
    k = k.repeat_interleave(group, dim=0)
    v = v.repeat_interleave(group, dim=0)
    scores = (q @ k.transpose(-1, -2)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v

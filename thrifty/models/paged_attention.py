"""Attention over the paged KV cache.

The KV cache of one layer is a pair of tensors of shape
`[num_blocks * block_size, num_kv_heads, head_dim]` (flat "slots"). A sequence owns
a list of blocks (its block table); its cached tokens live in the slots of those
blocks, in order. The model runner turns block tables into `slot_ids` once per step
so each layer only gathers.

A quantized KV cache (thrifty.kv.quant) is bound as one store object in place of both
tensors; attention then writes through it and gathers dequantized keys and values, using this
step's own keys and values in full precision for the new tokens. Plain tensors keep the
direct indexing below.

Keys are stored after RoPE, so a cached token carries its position with it and the
cache may later be compacted (eviction) without touching the keys. Within a
sequence the new tokens of this step always occupy the last `query_len` of its
`context_len` slots.

A sequence whose KV policy demotes evicted tokens (MiKV) also attends, in the same softmax, to its
low-precision side store (`SequenceSlice.demoted`), dequantized and placed before its cached slots.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from thrifty.kv.quant.base import LayerKV
from thrifty.kv.quant.lowbit import LowPrecisionTokens
from thrifty.models import chunk_attention

# Called with (layer index, attention probabilities [num_heads, query_len, context_len]) for a
# sequence whose KV policy scores tokens by attention; only then are probabilities materialised.
AttentionObserver = Callable[[int, torch.Tensor], None]


@dataclass(frozen=True)
class LayerLengths:
    """The slots each layer sees of a sequence whose KV policy gives layers different budgets.

    All layers share one block table, sized for the largest layer budget: after a compaction the
    sequence holds `shared` slots, of which layer l keeps only the first `kept[l]`. Layer l therefore
    sees slots [0, kept[l]) and [shared, context_len) (the tokens appended since); the slots in
    between hold nothing it may attend to.
    """

    kept: tuple[int, ...]
    shared: int


@dataclass
class SequenceSlice:
    """One sequence's share of a batched step."""

    query_start: int  # first row of this sequence in the flat batch of new tokens
    query_len: int  # number of new tokens this step
    context_len: int  # cached slots of this sequence after this step's writes
    slot_ids: torch.Tensor  # int64 [context_len]: flat cache slots, oldest first
    # Which new tokens each new token may see ([query_len, query_len] bool), for verifying a
    # tree of speculative tokens in one pass; None means causal. Cached slots are always visible.
    tree_mask: torch.Tensor | None = None
    observer: AttentionObserver | None = None
    layer_lengths: LayerLengths | None = None  # None: every layer sees every slot
    demoted: LowPrecisionTokens | None = None  # older tokens in low precision, visible to every query
    # Causal/tree masks by sliding window, built by the first layer that needs one and shared by the rest.
    _ordered: dict[int | None, torch.Tensor | None] = field(default_factory=dict, init=False, repr=False)


@dataclass
class DecodeBatch:
    """The single-token sequences of a step, padded so all of them attend in one SDPA call."""

    indices: frozenset[int]  # their positions in AttentionMetadata.sequences
    rows: torch.Tensor  # int64 [B]: their rows in the flat batch
    slot_ids: torch.Tensor  # int64 [B, max_context]: cache slots, padded with slot 0
    context_lens: torch.Tensor  # int64 [B, 1]
    valid: torch.Tensor  # bool [B, max_context]: which padded slots are real

    @classmethod
    def build(cls, sequences: list[SequenceSlice]) -> DecodeBatch | None:
        # Trees, observers, per-layer lengths and demoted tokens need the per-sequence path; a lone decode gains nothing
        # from padding.
        indices = [i for i, s in enumerate(sequences)
                   if s.query_len == 1 and s.tree_mask is None and s.observer is None and s.layer_lengths is None
                   and s.demoted is None]
        if len(indices) < 2:
            return None
        chosen = [sequences[i] for i in indices]
        device = chosen[0].slot_ids.device
        slot_ids = torch.nn.utils.rnn.pad_sequence([s.slot_ids for s in chosen], batch_first=True)
        lens = torch.tensor([s.context_len for s in chosen], device=device)[:, None]
        valid = torch.arange(slot_ids.shape[1], device=device)[None, :] < lens
        rows = torch.tensor([s.query_start for s in chosen], device=device)
        return cls(frozenset(indices), rows, slot_ids, lens, valid)


@dataclass
class AttentionMetadata:
    """Everything attention needs about the batch, built once per step by the model runner."""

    slot_mapping: torch.Tensor  # int64 [num_new_tokens]: where each new token's K/V goes
    sequences: list[SequenceSlice]
    # Built on first use by the first layer and shared by the others.
    _decode: DecodeBatch | None = field(default=None, init=False, repr=False)
    _decode_built: bool = field(default=False, init=False, repr=False)

    @property
    def decode(self) -> DecodeBatch | None:
        if not self._decode_built:
            self._decode, self._decode_built = DecodeBatch.build(self.sequences), True
        return self._decode


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Store this step's keys and values ([T, kv_heads, head_dim]) in their slots."""
    k_cache.index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def _allowed_keys(seq: SequenceSlice, sliding_window: int | None, device: torch.device,
                  layer: int = 0) -> torch.Tensor | None:
    """Boolean [query_len, context_len] mask, None when everything is visible: causal (or the tree),
    banded for sliding-window layers, without the slots this layer evicted (per-layer budgets)."""
    if sliding_window not in seq._ordered:
        seq._ordered[sliding_window] = _ordered_keys(seq, sliding_window, device)
    allowed = seq._ordered[sliding_window]
    lengths = seq.layer_lengths
    if lengths is not None and lengths.kept[layer] < lengths.shared:
        allowed = (torch.ones(seq.query_len, seq.context_len, dtype=torch.bool, device=device) if allowed is None
                   else allowed.clone())  # the shared mask stays as it is for the other layers
        allowed[:, lengths.kept[layer]:lengths.shared] = False
    return allowed


def _ordered_keys(seq: SequenceSlice, sliding_window: int | None, device: torch.device) -> torch.Tensor | None:
    """The causal (or tree) mask, banded for sliding-window layers."""
    query_len, context_len = seq.query_len, seq.context_len
    if query_len == 1 and (sliding_window is None or context_len <= sliding_window):
        return None  # a single new token may see every cached slot
    query_slots = torch.arange(context_len - query_len, context_len, device=device)[:, None]
    key_slots = torch.arange(context_len, device=device)[None, :]
    allowed = key_slots <= query_slots
    if seq.tree_mask is not None:
        allowed[:, context_len - query_len:] = seq.tree_mask
        # A tree node sits at its depth past the root, not at its slot: windows count from there.
        query_slots = context_len - query_len + seq.tree_mask.to(device).sum(dim=-1, keepdim=True) - 1
    if sliding_window is not None:
        allowed &= key_slots > query_slots - sliding_window
    return allowed


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, *,
                    scale: float, layer: int, sliding_window: int | None = None,
                    softcap: float | None = None, bf16_chunks: bool = False) -> torch.Tensor:
    """Write k, v into the cache, then attend every new query to its sequence's cache.

    q: [T, num_heads, head_dim]; k, v: [T, num_kv_heads, head_dim]. Returns [T, num_heads, head_dim].
    `layer` identifies the layer to attention observers. With `bf16_chunks`, sequences with a long
    chunk of new tokens attend in bfloat16 matmuls (thrifty.models.chunk_attention).
    """
    store = k_cache if isinstance(k_cache, LayerKV) else None
    if store is None:
        write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
    else:
        store.write(meta.slot_mapping, k, v)
    out = torch.empty_like(q)
    decode = meta.decode if softcap is None else None
    batched: frozenset[int] = frozenset()
    if decode is not None:
        out[decode.rows] = _batched_decode(q, k_cache, v_cache, decode, scale, sliding_window, k, v)
        batched = decode.indices
    for i, seq in enumerate(meta.sequences):
        if i in batched:
            continue
        rows = slice(seq.query_start, seq.query_start + seq.query_len)
        qs = q[rows].transpose(0, 1)  # [H, q, D]
        if store is None:
            ks = k_cache[seq.slot_ids].transpose(0, 1).to(q.dtype)  # [KVH, ctx, D]
            vs = v_cache[seq.slot_ids].transpose(0, 1).to(q.dtype)
        else:  # cached tokens dequantized, this step's own tokens as computed
            old_k, old_v = store.gather(seq.slot_ids[:seq.context_len - seq.query_len], q.dtype)
            ks = torch.cat((old_k, k[rows].to(q.dtype))).transpose(0, 1)
            vs = torch.cat((old_v, v[rows].to(q.dtype))).transpose(0, 1)
        allowed = _allowed_keys(seq, sliding_window, q.device, layer)
        demoted = 0
        if seq.demoted is not None:  # older than every query: visible to all of them
            low_k, low_v = seq.demoted.layer(layer, q.dtype)
            demoted = low_k.shape[1]
            ks, vs = torch.cat((low_k, ks), dim=1), torch.cat((low_v, vs), dim=1)
            if allowed is not None:
                allowed = F.pad(allowed, (demoted, 0), value=True)
        if (bf16_chunks and softcap is None and seq.observer is None
                and seq.query_len >= chunk_attention.MIN_QUERIES):
            attended = chunk_attention.bf16_chunk_attention(qs, ks, vs, allowed, scale)
        elif softcap is None and seq.observer is None:
            # With a batch dimension PyTorch's CPU kernel is the fused (flash) one; 3-D inputs take the
            # math path, which materialises every [heads, q, ctx] score (hundreds of MB for a 2k prompt).
            attended = F.scaled_dot_product_attention(
                qs[None], ks[None], vs[None], attn_mask=allowed, scale=scale, enable_gqa=True)[0]
        else:
            probs = attention_probs(qs, ks, allowed, scale, softcap)
            if seq.observer is not None:
                seq.observer(layer, probs[..., demoted:])  # the policy scores the cached slots only
            attended = probs.to(q.dtype) @ vs.repeat_interleave(qs.shape[0] // vs.shape[0], dim=0)
        out[rows] = attended.transpose(0, 1)
    return out


def _batched_decode(q: torch.Tensor, k_cache: torch.Tensor | LayerKV, v_cache: torch.Tensor | LayerKV,
                    decode: DecodeBatch, scale: float, sliding_window: int | None,
                    k_new: torch.Tensor | None = None, v_new: torch.Tensor | None = None) -> torch.Tensor:
    """One SDPA call for all single-token sequences over their padded, gathered caches: [B, H, D]."""
    qs = q[decode.rows][:, :, None, :]  # [B, H, 1, D]
    if isinstance(k_cache, LayerKV):
        ks, vs = k_cache.gather(decode.slot_ids, q.dtype)  # [B, ctx, KVH, D]
        if k_new is not None and v_new is not None:  # each new token as computed, at its last valid slot
            batch, last = torch.arange(len(decode.rows), device=q.device), decode.context_lens[:, 0] - 1
            ks[batch, last] = k_new[decode.rows].to(q.dtype)
            vs[batch, last] = v_new[decode.rows].to(q.dtype)
        ks, vs = ks.permute(0, 2, 1, 3), vs.permute(0, 2, 1, 3)
    else:
        ks = k_cache[decode.slot_ids].permute(0, 2, 1, 3).to(q.dtype)  # [B, KVH, ctx, D]
        vs = v_cache[decode.slot_ids].permute(0, 2, 1, 3).to(q.dtype)
    allowed = decode.valid
    if sliding_window is not None:
        slots = torch.arange(allowed.shape[1], device=q.device)[None, :]
        allowed = allowed & (slots >= decode.context_lens - sliding_window)
    attended = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=allowed[:, None, None, :], scale=scale,
                                              enable_gqa=True)
    return attended[:, :, 0, :]


def attention_probs(q: torch.Tensor, k: torch.Tensor, allowed: torch.Tensor | None, scale: float,
                    softcap: float | None = None) -> torch.Tensor:
    """Explicit float32 softmax(q k^T) [heads, q, ctx], with optional tanh soft-capping (which SDPA lacks)."""
    k = k.repeat_interleave(q.shape[0] // k.shape[0], dim=0)
    scores = (q @ k.transpose(-1, -2)).float() * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, dim=-1)

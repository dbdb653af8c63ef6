"""One sequence's demoted tokens in 2- or 4-bit codes: MiKV's low-precision side store.

MiKV (thrifty.kv.policies.mikv) does not drop the tokens a compaction evicts from the paged cache;
it hands them here, for every layer at once, and attention reads them back dequantized next to the
full-precision slots (thrifty.models.paged_attention). Tensors grow with what is held and nothing
else: `nbytes` is the memory really in use.

- Values: per token and KV head, asymmetric over the head's channels (KIVI's per-token values).
- Keys: per channel and KV head, asymmetric over a group of up to `group_size` tokens demoted by
  the same compaction. Keys have a few outlier channels of large magnitude shared by all tokens
  (KIVI, Liu et al. 2024); per-token groups put those outliers in every group's range and at 2 bits
  wipe out the other channels, per-channel groups give each channel its own range. The grouping is
  by demotion, not by position: the tokens of a group need not be neighbours, only keys of one head.
  A partial last group is padded with copies of its last token, which leaves min and max unchanged.
- Every layer demotes the same number of tokens per compaction (heads pick different ones), so the
  token -> key group map is kept once for all layers.

Per token, per layer and KV head: head_dim * bits / 8 bytes of key codes and as many of value codes,
4 bytes of value scale and zero, 4 * head_dim / group bytes of key scales and zeros (group = the
tokens demoted together, at most `group_size`); plus 4 bytes per token for the group map.

The store can shed its oldest groups (`drop_oldest`) when the KV pool it is charged to runs short.
"""

from __future__ import annotations

import torch

from thrifty.kv.quant.kivi import pack, quantize_asym, unpack

_PER_GROUP = ("k_scale", "k_zero")  # indexed by key group; every other tensor by token


class LowPrecisionTokens:
    def __init__(self, num_layers: int, bits: int = 2, group_size: int = 32) -> None:
        if bits not in (2, 4):
            raise ValueError(f"low-precision KV codes have 2 or 4 bits, not {bits}")
        if group_size < 1:
            raise ValueError(f"group_size must be at least 1, not {group_size}")
        self.num_layers, self.bits, self.group_size = num_layers, bits, group_size
        self.num_tokens = 0
        self.num_groups = 0
        self.group_of: torch.Tensor | None = None  # int32 [M]: each token's key group, in every layer
        # per layer: key codes [KVH, M, D*bits/8], key scale and zero [KVH, groups, D],
        # value codes [KVH, M, D*bits/8], value scale and zero [KVH, M]
        self.layers: list[dict[str, torch.Tensor]] = [{} for _ in range(num_layers)]

    def append(self, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        """Demote E tokens in every layer: keys[l], values[l] are [kv_heads, E, head_dim] (E equal in every layer)."""
        if len(keys) != self.num_layers or len(values) != self.num_layers:
            raise ValueError(f"expected keys and values for {self.num_layers} layers")
        count = keys[0].shape[1]
        if any(k.shape[1] != count or v.shape[1] != count for k, v in zip(keys, values)):
            raise ValueError("every layer must demote the same number of tokens")
        if count == 0:
            return
        g = self.group_size
        groups = -(-count // g)
        device = keys[0].device
        group_of = (self.num_groups + torch.arange(count, device=device) // g).to(torch.int32)
        for layer, (k, v) in enumerate(zip(keys, values)):
            # pad to whole groups with the last token repeated (min/max unchanged), quantize per channel
            padded = torch.cat((k, k[:, -1:].expand(-1, groups * g - count, -1)), dim=1)
            kc, ks, kz = quantize_asym(padded.unflatten(1, (groups, g)), dim=2, bits=self.bits)
            vc, vs, vz = quantize_asym(v, dim=-1, bits=self.bits)
            new = {"k": pack(kc.flatten(1, 2)[:, :count], self.bits), "k_scale": ks[:, :, 0], "k_zero": kz[:, :, 0],
                   "v": pack(vc, self.bits), "v_scale": vs[..., 0], "v_zero": vz[..., 0]}
            held = self.layers[layer]
            self.layers[layer] = new if not held else {
                name: torch.cat((held[name], part), dim=1) for name, part in new.items()}
        self.group_of = group_of if self.group_of is None else torch.cat((self.group_of, group_of))
        self.num_tokens += count
        self.num_groups += groups

    def layer(self, layer: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's demoted keys and values, dequantized: [kv_heads, M, head_dim] each."""
        held = self.layers[layer]
        if not held:
            raise RuntimeError("no tokens demoted yet")
        group = self.group_of.long()
        k = unpack(held["k"], self.bits).float() * held["k_scale"][:, group].float() + held["k_zero"][:, group].float()
        v = (unpack(held["v"], self.bits).float() * held["v_scale"].float()[..., None]
             + held["v_zero"].float()[..., None])
        return k.to(dtype), v.to(dtype)

    def drop_oldest(self, max_bytes: int) -> int:
        """Drop the oldest key groups (the tokens demoted first) until `nbytes <= max_bytes` (>= 0);
        returns how many tokens went."""
        if self.nbytes <= max_bytes:
            return 0
        counts = torch.bincount(self.group_of.long(), minlength=self.num_groups)  # tokens per group
        group_bytes = sum(parts[name].nbytes for parts in self.layers for name in _PER_GROUP) // self.num_groups
        token_bytes = (self.nbytes - group_bytes * self.num_groups) // self.num_tokens
        left = self.nbytes - torch.cumsum(counts * token_bytes + group_bytes, 0)  # after dropping groups 0..i
        groups = int((left > max_bytes).sum()) + 1
        tokens = int(counts[:groups].sum())
        if groups == self.num_groups:
            self.layers = [{} for _ in range(self.num_layers)]
            self.group_of = None
        else:  # clone: a slice would keep the dropped tokens' memory alive
            self.layers = [{name: t[:, groups if name in _PER_GROUP else tokens:].clone()
                            for name, t in parts.items()} for parts in self.layers]
            self.group_of = self.group_of[tokens:] - groups
        self.num_tokens -= tokens
        self.num_groups -= groups
        return tokens

    @property
    def nbytes(self) -> int:
        held = sum(t.nbytes for parts in self.layers for t in parts.values())
        return held + (0 if self.group_of is None else self.group_of.nbytes)

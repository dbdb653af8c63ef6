"""The per-layer KV store interface and the full-precision store.

A store holds one layer's keys and values for every flat slot of the pool
(`[num_blocks * block_size, num_kv_heads, head_dim]` logically) and offers

- `write(slots, k, v)`: store this step's keys and values ([T, kv_heads, head_dim]) in their slots;
- `gather(slots) -> (k, v)`: the keys and values of any slots (any shape of slot ids), in float;
- `copy_slots(src, dst)`: move slots (speculative rollback keeps accepted tree nodes this way);
- `nbytes`: the memory it holds.

The full-precision cache keeps its plain tensors: the model binds them directly and attention
indexes them on its existing fast paths, so `DenseKV` is only the uniform face the eviction code uses.
Quantized stores are bound to the model in place of the tensors (they carry `shape`, which the
model checks) and attention calls their methods instead.
"""

from __future__ import annotations

import torch


class LayerKV:
    """One layer's keys and values; see the module docstring."""

    shape: tuple[int, int, int]  # (num_slots, num_kv_heads, head_dim)
    device: torch.device
    dtype: torch.dtype  # the float dtype gathers return by default (the model's)

    def write(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        raise NotImplementedError

    def gather(self, slots: torch.Tensor, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def copy_slots(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        k, v = self.gather(src)
        self.write(dst, k, v)

    @property
    def nbytes(self) -> int:
        raise NotImplementedError


class DenseKV(LayerKV):
    """The full-precision cache: two plain tensors."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k, self.v = k, v
        self.shape = tuple(k.shape)
        self.device, self.dtype = k.device, k.dtype

    def write(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k.index_copy_(0, slots, k.to(self.k.dtype))
        self.v.index_copy_(0, slots, v.to(self.v.dtype))

    def gather(self, slots: torch.Tensor, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = dtype or self.dtype
        return self.k[slots].to(dtype), self.v[slots].to(dtype)

    def copy_slots(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        self.k.index_copy_(0, dst, self.k.index_select(0, src))
        self.v.index_copy_(0, dst, self.v.index_select(0, src))

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


def as_store(k_cache: torch.Tensor | LayerKV, v_cache: torch.Tensor | LayerKV) -> LayerKV:
    """A bound (k_cache, v_cache) pair as a store: quantized stores are bound as (store, store)."""
    if isinstance(k_cache, LayerKV):
        return k_cache
    return DenseKV(k_cache, v_cache)


def copy_slots(k_cache: torch.Tensor | LayerKV, v_cache: torch.Tensor | LayerKV,
               src: torch.Tensor, dst: torch.Tensor) -> None:
    """Copy slots src -> dst in one layer's cache, whatever its storage."""
    if isinstance(k_cache, LayerKV):
        k_cache.copy_slots(src.to(k_cache.device), dst.to(k_cache.device))
        return
    k_cache.index_copy_(0, dst.to(k_cache.device), k_cache.index_select(0, src.to(k_cache.device)))
    v_cache.index_copy_(0, dst.to(v_cache.device), v_cache.index_select(0, src.to(v_cache.device)))

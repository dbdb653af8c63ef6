"""The KV cache tensors and how large they may be."""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch

from thrifty.config import ModelConfig
from thrifty.errors import InvalidRequestError
from thrifty.kv.quant import (
    BLOCK_STORES,
    KV_CACHE_DTYPES,
    DenseKV,
    Int8KV,
    LayerKV,
    ResidualBlocks,
)

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_bytes(text: str | int) -> int:
    """'512MiB', '2GB', '1000000' -> bytes."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).upper() not in _UNITS:
        raise InvalidRequestError(f"cannot read {text!r} as a size; write e.g. 512MiB, 2GB or a number of bytes")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def check_kv_cache_dtype(kv_cache_dtype: str) -> None:
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise InvalidRequestError(f"kv_cache_dtype {kv_cache_dtype!r} is unknown; use one of "
                                  f"{', '.join(KV_CACHE_DTYPES)} (auto = the model's dtype)")


def residual_blocks(max_num_seqs: int) -> int:
    """Full-precision blocks a kivi/gear cache starts with: one partial block per sequence, plus a few."""
    return max_num_seqs + 4


def block_bytes(config: ModelConfig, dtype: torch.dtype, block_size: int, kv_cache_dtype: str = "auto") -> int:
    """Bytes one KV block of `block_size` tokens occupies across all layers."""
    check_kv_cache_dtype(kv_cache_dtype)
    heads, dim = config.num_kv_heads, config.head_dim
    if kv_cache_dtype == "int8":
        per_layer = Int8KV.bytes_per_slot(heads, dim) * block_size
    elif kv_cache_dtype in BLOCK_STORES:
        cls, settings = BLOCK_STORES[kv_cache_dtype]
        per_layer = cls.bytes_per_block(block_size, heads, dim, **settings)
    else:
        return config.kv_bytes_per_token(dtype.itemsize) * block_size
    return per_layer * config.num_layers


def fixed_bytes(config: ModelConfig, dtype: torch.dtype, block_size: int, kv_cache_dtype: str,
                max_num_seqs: int) -> int:
    """Bytes a cache holds besides its blocks (kivi/gear's full-precision residual blocks)."""
    if kv_cache_dtype not in BLOCK_STORES:
        return 0
    return residual_blocks(max_num_seqs) * config.kv_bytes_per_token(dtype.itemsize) * block_size


def pool_blocks(config: ModelConfig, dtype: torch.dtype, block_size: int,
                kv_cache_tokens: int | None, kv_cache_bytes: int | None, default_tokens: int,
                kv_cache_dtype: str = "auto", max_num_seqs: int = 64) -> int:
    """Number of KV blocks for a pool given in tokens or bytes (never more than asked for).

    A byte budget is divided by the bytes of a block in the chosen `kv_cache_dtype`, so a
    quantized cache holds more tokens in the same memory; kivi/gear's residual side store is
    taken off the budget first.
    """
    if kv_cache_tokens is not None and kv_cache_bytes is not None:
        raise InvalidRequestError("give the KV pool size in tokens or in bytes, not both")
    if kv_cache_bytes is not None:
        usable = kv_cache_bytes - fixed_bytes(config, dtype, block_size, kv_cache_dtype, max_num_seqs)
        blocks = max(0, usable) // block_bytes(config, dtype, block_size, kv_cache_dtype)
        what = f"{kv_cache_bytes} bytes"
    else:
        tokens = default_tokens if kv_cache_tokens is None else kv_cache_tokens
        blocks = tokens // block_size
        what = f"{tokens} tokens"
    if blocks < 1:
        raise InvalidRequestError(f"a KV pool of {what} holds no block of {block_size} tokens"
                                  f"{'' if kv_cache_dtype == 'auto' else f' in {kv_cache_dtype}'}; make it larger")
    return blocks


class KVCache:
    """Per layer, the keys and values of [num_blocks * block_size] slots.

    `layers` is what the model binds: for the default `kv_cache_dtype="auto"`, one K and one V
    tensor of [num_blocks * block_size, num_kv_heads, head_dim] per layer; for a quantized cache,
    the layer's store twice (attention calls its methods). `stores` is the uniform view
    (thrifty.kv.quant.LayerKV) that eviction and speculative rollback use.
    """

    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int,
                 dtype: torch.dtype, device: torch.device, kv_cache_dtype: str = "auto",
                 max_num_seqs: int = 64) -> None:
        check_kv_cache_dtype(kv_cache_dtype)
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.kv_cache_dtype = kv_cache_dtype
        self.residual: ResidualBlocks | None = None
        heads, dim = config.num_kv_heads, config.head_dim
        shape = (num_blocks * block_size, heads, dim)
        if kv_cache_dtype == "auto":
            self.layers = [(torch.zeros(shape, dtype=dtype, device=device),
                            torch.zeros(shape, dtype=dtype, device=device)) for _ in range(config.num_layers)]
            self.stores: list[LayerKV] = [DenseKV(k, v) for k, v in self.layers]
            return
        if kv_cache_dtype == "int8":
            self.stores = [Int8KV(shape[0], heads, dim, dtype, device) for _ in range(config.num_layers)]
        else:
            cls, settings = BLOCK_STORES[kv_cache_dtype]
            self.residual = ResidualBlocks(num_blocks, block_size, min(num_blocks, residual_blocks(max_num_seqs)),
                                           device)
            self.stores = [cls(num_blocks, block_size, heads, dim, dtype, device, self.residual, **settings)
                           for _ in range(config.num_layers)]
        self.layers = [(s, s) for s in self.stores]

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.stores)

    @property
    def residual_nbytes(self) -> int:
        """Bytes of kivi/gear's full-precision side store (included in nbytes)."""
        return sum(getattr(s, "residual_nbytes", 0) for s in self.stores)

    @property
    def block_nbytes(self) -> int:
        """Bytes one pool block holds across all layers (without kivi/gear's side store): the unit in
        which memory kept outside the pool (MiKV's side store) is charged to it."""
        return (self.nbytes - self.residual_nbytes) // self.num_blocks

    @property
    def bytes_per_token(self) -> float:
        """Bytes a cached token takes in the block pool, across layers (without kivi/gear's side store)."""
        return (self.nbytes - self.residual_nbytes) / (self.num_blocks * self.block_size)

    def sync(self, blocks, seqs: Iterable) -> None:
        """After a step (speculative tokens settled): kivi/gear seal the blocks that filled up and
        takes back the residual blocks of freed ones. A no-op for the other caches."""
        residual = self.residual
        if residual is None:
            return
        bs, full = self.block_size, []
        for seq in seqs:
            table = seq.block_table
            for i in range(min(len(table), seq.num_cached_slots // bs) - 1, -1, -1):
                if table[i] not in residual.rid:
                    break
                full.append(table[i])
        residual.sync(full, lambda b: blocks.ref_counts[b] == 0, lambda b: blocks.block_hash[b] is not None)

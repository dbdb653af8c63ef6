"""The KV cache tensors and how large they may be."""

from __future__ import annotations

import re

import torch

from thrifty.config import ModelConfig
from thrifty.errors import InvalidRequestError

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


def pool_blocks(config: ModelConfig, dtype: torch.dtype, block_size: int,
                kv_cache_tokens: int | None, kv_cache_bytes: int | None, default_tokens: int) -> int:
    """Number of KV blocks for a pool given in tokens or bytes (never more than asked for)."""
    if kv_cache_tokens is not None and kv_cache_bytes is not None:
        raise InvalidRequestError("give the KV pool size in tokens or in bytes, not both")
    if kv_cache_bytes is not None:
        block_bytes = config.kv_bytes_per_token(dtype.itemsize) * block_size
        blocks = kv_cache_bytes // block_bytes
        what = f"{kv_cache_bytes} bytes"
    else:
        tokens = default_tokens if kv_cache_tokens is None else kv_cache_tokens
        blocks = tokens // block_size
        what = f"{tokens} tokens"
    if blocks < 1:
        raise InvalidRequestError(f"a KV pool of {what} holds no block of {block_size} tokens; make it larger")
    return blocks


class KVCache:
    """Per layer, one K and one V tensor of [num_blocks * block_size, num_kv_heads, head_dim]."""

    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        shape = (num_blocks * block_size, config.num_kv_heads, config.head_dim)
        self.layers = [(torch.zeros(shape, dtype=dtype, device=device),
                        torch.zeros(shape, dtype=dtype, device=device)) for _ in range(config.num_layers)]

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self.layers)

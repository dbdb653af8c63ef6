"""Quantized KV caches: `EngineConfig.kv_cache_dtype` / `--kv-cache-dtype`.

- `auto`: the model's dtype (plain tensors, the existing fast paths);
- `int8`: symmetric int8, a float16 scale per token and KV head (thrifty.kv.quant.int8);
- `kivi4`: KIVI 4-bit, keys per channel over a block, values per token, asymmetric, with the
  sequences' partial last blocks in full precision (thrifty.kv.quant.kivi).
"""

from thrifty.kv.quant.base import DenseKV, LayerKV, as_store, copy_slots
from thrifty.kv.quant.int8 import Int8KV
from thrifty.kv.quant.kivi import KiviKV, ResidualBlocks

KV_CACHE_DTYPES = ("auto", "int8", "kivi4")

__all__ = ["KV_CACHE_DTYPES", "DenseKV", "Int8KV", "KiviKV", "LayerKV", "ResidualBlocks", "as_store", "copy_slots"]

"""int8 KV cache: symmetric, one float16 scale per token per KV head for keys and for values.

Every slot is quantized on its own, so writes, gathers and slot moves need no bookkeeping:
a token costs 2 * (head_dim + 2) bytes per KV head and layer instead of 2 * head_dim * 4 (fp32).
"""

from __future__ import annotations

import torch

from thrifty.kv.quant.base import LayerKV

FP16_MIN_SCALE = 2.0 ** -14  # smallest normal float16: scales stay exact to 11 bits
FP16_MAX = 65504.0


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> (int8 codes [..., D], float16 scale [...]).

    |x - q * scale| <= scale / 2 + max|x| * 2^-11 (the float16 rounding of the scale). Idempotent:
    quantizing dequantized values gives the same codes and scale, so moving tokens costs nothing.
    """
    x = x.float()
    scale = (x.abs().amax(dim=-1) / 127.0).clamp(FP16_MIN_SCALE, FP16_MAX).to(torch.float16)
    q = torch.round(x / scale.float()[..., None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.float() * scale.float()[..., None]).to(dtype)


class Int8KV(LayerKV):
    def __init__(self, num_slots: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.shape = (num_slots, num_kv_heads, head_dim)
        self.device, self.dtype = device, dtype
        self.k = torch.zeros(self.shape, dtype=torch.int8, device=device)
        self.v = torch.zeros(self.shape, dtype=torch.int8, device=device)
        self.k_scale = torch.zeros(self.shape[:2], dtype=torch.float16, device=device)
        self.v_scale = torch.zeros(self.shape[:2], dtype=torch.float16, device=device)

    @staticmethod
    def bytes_per_slot(num_kv_heads: int, head_dim: int) -> int:
        return 2 * num_kv_heads * (head_dim + 2)

    def write(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        kq, ks = quantize_int8(k)
        vq, vs = quantize_int8(v)
        self.k.index_copy_(0, slots, kq)
        self.v.index_copy_(0, slots, vq)
        self.k_scale.index_copy_(0, slots, ks)
        self.v_scale.index_copy_(0, slots, vs)

    def gather(self, slots: torch.Tensor, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = dtype or self.dtype
        return (dequantize_int8(self.k[slots], self.k_scale[slots], dtype),
                dequantize_int8(self.v[slots], self.v_scale[slots], dtype))

    def copy_slots(self, src: torch.Tensor, dst: torch.Tensor) -> None:  # exact: codes and scales move as they are
        for t in (self.k, self.v, self.k_scale, self.v_scale):
            t.index_copy_(0, dst, t.index_select(0, src))

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes + self.k_scale.nbytes + self.v_scale.nbytes

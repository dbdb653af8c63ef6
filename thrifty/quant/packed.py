"""Weights kept in a run format that is cheaper to read than float32, with the matmul that reads them.

Decode multiplies a few rows by every weight, so it is bound by the bytes of weights read:
the int8 and int4 formats run PyTorch's weight-only CPU kernels on bfloat16 activations.
Prefill multiplies many rows, so it is bound by matmul throughput: the weight is expanded
to bfloat16 for that one call and oneDNN's bfloat16 GEMM does the work.
Vocabulary-sized int8 heads instead run an int8 x int8 GEMM (oneDNN's on CPUs with AMX, fbgemm's
elsewhere) on activations split into two int8 parts (see `Int8Weight`): the weight-only int8
kernel's time grows fast with the rows.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F

from thrifty.loading.memory import release_free_memory
from thrifty.quant.gemm_rows import with_padded_rows
from thrifty.quant.int4_tiles import (
    TILE_N,
    amx_available,
    codes_into,
    int4_tiles_mm,
    to_tiles,
    use_tiles,
)

# Above this many rows a call expands the weight to bfloat16 and runs a dense GEMM instead of the
# weight-only kernel, whose time grows with the rows while the expansion is a fixed cost per call.
# Crossovers measured on a 2-core AVX-512 CPU (SmolLM2's MLP weights; the 49k-row lm_head crosses
# later): int8 about 32 rows, int4 about 128 (its expansion unpacks nibbles: 2 ms for a
# 3072x576 weight, 117 ms for the lm_head). scripts/bench_packed_rows.py measures them.
DENSE_ROWS = {"int8": 32, "int4": 128}
INT4_GROUP = 32
# Int8 weights with at least this many outputs (vocabulary heads) multiply through fbgemm's int8
# GEMM: on a 2-core AVX-512 VNNI CPU the 49152x576 head took 0.66 ms at 1 row and 3.96 ms at 16
# against 1.41 and 9.65 for the weight-only kernel (scripts/bench_packed_rows.py); on weights of
# 576-3072 outputs the extra activation ops cost about as much as the GEMM saves.
INT8_GEMM_MIN_OUT = 16384
# Up to this many rows; past it the bfloat16 GEMM on the expanded weight wins (281 against 161 ms
# for that head at 512 rows, 49 against about 80 at 128).
INT8_GEMM_ROWS = 128
# Rows per GEMM call: a call's output and int32 scratch are 2 x rows x out_features each (6 MB
# apiece for a 16-row call to that head). With fbgemm two calls of 8 rows took 4.0 ms against 3.4
# for one of 16 (AMD EPYC), and kept about 10 MB off the peak RSS of a batch-16 decode step; with
# oneDNN on AMX one call of 16 took 2.1 ms against 3.6 for two of 8 (Sapphire Rapids).
INT8_GEMM_CHUNK_ROWS = {"fbgemm": 8, "onednn": 16}
# Pack big weights (the 49k-row lm_head) a slice of rows at a time, so the float temporaries of
# packing do not raise the peak RSS by several copies of the whole weight.
PACK_ROWS = 4096


class PackedWeight:
    """A [out_features, in_features] weight in a run format; `linear` is x W^T (+ b) in x's dtype."""

    out_features: int

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def dequantize(self) -> torch.Tensor:
        """The weight as float32 [out_features, in_features] (for checks and tests)."""
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        raise NotImplementedError

    @classmethod
    def from_float(cls, w: torch.Tensor) -> PackedWeight:
        raise NotImplementedError


def _finish(y: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    y = y.to(dtype)
    return y if bias is None else y + bias


class BF16Weight(PackedWeight):
    def __init__(self, w: torch.Tensor) -> None:
        self.w = w.to(torch.bfloat16).contiguous()
        self.out_features = self.w.shape[0]

    @classmethod
    def from_float(cls, w: torch.Tensor) -> BF16Weight:
        return cls(w)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return _finish(with_padded_rows(lambda rows: F.linear(rows, self.w), x.to(torch.bfloat16)), bias, x.dtype)

    def dequantize(self) -> torch.Tensor:
        return self.w.float()

    @property
    def nbytes(self) -> int:
        return self.w.nbytes


class Int8Weight(PackedWeight):
    """Symmetric int8 per output channel: w = q * scale[row].

    Weights of INT8_GEMM_MIN_OUT outputs or more are held only as a packed weight of an int8 x int8
    -> int32 GEMM and multiplied by it up to INT8_GEMM_ROWS rows: oneDNN's on CPUs with AMX (on a
    2-core Sapphire Rapids the 49152x576 head took 2.1 ms at 16 rows against 4.2 for fbgemm's, and
    1.1 ms at one row as fbgemm's), fbgemm's on other CPUs with VNNI.
    Its activations are int8 too, so each row is split in two: x = amax/127 * (q1 + q2/254), q1
    the row rounded to 127 levels of its largest magnitude and q2 the rounding error at 254 times
    finer steps. That keeps about 16 bits per row, finer than the bfloat16 activations of the
    weight-only kernel (SmolLM2's perplexity 30.61 against 30.63, BENCHMARKS "Int8 GEMM for the
    lm_head"), and the integer sums are exact, so a row's logits do not depend on the other rows
    of the batch.
    """

    def __init__(self, q: torch.Tensor, scale: torch.Tensor) -> None:
        self.scale = scale.to(torch.bfloat16).contiguous()  # [N]; the kernel wants the activations' dtype
        self.out_features, self.in_features = q.shape
        self._onednn = self._gemm = self._q = None
        if not _use_int8_gemm(self.out_features):
            self._q = q.contiguous()  # int8 [N, K]
        elif amx_available():
            self._onednn = torch.ops.onednn.qlinear_prepack(q.contiguous(), None)
            self._onednn_scale = self.scale.float()
            self._onednn_ones = torch.ones(self.out_features)
            self._onednn_zeros = torch.zeros(self.out_features, dtype=torch.long)
        else:
            self._gemm = _fbgemm_pack(q, self.scale)

    @property
    def q(self) -> torch.Tensor:
        """The int8 codes [N, K] (unpacked from a GEMM's packed weight for the few calls that need them)."""
        if self._q is not None:
            return self._q
        if self._gemm is not None:
            return torch.ops.quantized.linear_unpack(self._gemm)[0].int_repr()
        # oneDNN has no unpack: multiply the unit vectors, whose products are the codes times the scale.
        units = torch.eye(self.in_features)
        columns = [torch.round(self._gemm_rows(rows) / self._onednn_scale).t() for rows in units.split(64)]
        return torch.cat(columns, dim=1).to(torch.int8)

    def _gemm_rows(self, x: torch.Tensor) -> torch.Tensor:
        """float32 x [M, K] times the weight through the int8 GEMM, the activations as two int8
        parts per row (see the class doc); the GEMM's integer sums are exact."""
        rows = x.shape[0]
        amax = x.abs().amax(dim=1, keepdim=True).clamp(min=1e-30)
        u = x * (127 / amax)
        high = torch.round(u)
        low = torch.round((u - high) * 254)  # |u - high| <= 1/2, so |low| <= 127
        parts = torch.cat([high, low])
        if self._onednn is not None:
            # Codes q + 128 (zero point 128) and unit scales: the integer sums come back as floats, and
            # are scaled below by the same ops whatever the batch (oneDNN's own scaling rounds
            # differently in its kernels for few and many rows).
            y = torch.ops.onednn.qlinear_pointwise((parts + 128).to(torch.uint8), 1.0, 128, self._onednn,
                                                   self._onednn_ones, self._onednn_zeros, None, 1.0, 0,
                                                   torch.float32, "none", [], "")
            return y[rows:].div_(254).add_(y[:rows]).mul_(amax / 127).mul_(self._onednn_scale)
        # The op quantizes its input with the scale and zero point given: q/127 comes back as code q + 128.
        y = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(parts / 127, 1 / 127, 128, self._gemm)
        return y[rows:].div_(254).add_(y[:rows]).mul_(amax)  # in place: the logits of a batch are megabytes

    @classmethod
    def from_float(cls, w: torch.Tensor) -> Int8Weight:
        w = w.float()
        scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
        # Round the scale to bfloat16 first, so the codes are chosen for the scale the kernel uses.
        scale = scale.to(torch.bfloat16).float()
        q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
        return cls(q, scale)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        rows = x.shape[0]
        packed = self._q is None
        if packed and rows <= INT8_GEMM_ROWS:
            y = self._int8_gemm(x.float())
        elif not packed and rows <= DENSE_ROWS["int8"]:
            y = torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), self._q, self.scale)
        else:
            dense = self.q.to(torch.bfloat16) * self.scale[:, None]
            y = with_padded_rows(lambda rows: F.linear(rows, dense), x.to(torch.bfloat16))
        return _finish(y, bias, x.dtype)

    def _int8_gemm(self, x: torch.Tensor) -> torch.Tensor:
        """float32 x [M, K] times the weight, INT8_GEMM_CHUNK_ROWS rows per GEMM call into one output."""
        step = INT8_GEMM_CHUNK_ROWS["onednn" if self._onednn is not None else "fbgemm"]
        if x.shape[0] <= step:
            return self._gemm_rows(x)
        y = x.new_empty(x.shape[0], self.out_features)
        for start in range(0, x.shape[0], step):
            chunk = slice(start, start + step)
            y[chunk] = self._gemm_rows(x[chunk])
        return y

    def dequantize(self) -> torch.Tensor:
        return self.q.float() * self.scale.float()[:, None]

    @property
    def nbytes(self) -> int:
        # A GEMM's packed weight holds the codes plus an int32 offset (compensation) per output column.
        offsets = 0 if self._q is not None else 4 * self.out_features
        return self.out_features * self.in_features + offsets + self.scale.nbytes


def _use_int8_gemm(out_features: int) -> bool:
    # Without VNNI fbgemm multiplies uint8 x int8 pairs into saturating int16 sums, which our
    # full-range activation codes can overflow.
    return out_features >= INT8_GEMM_MIN_OUT and torch.cpu._is_vnni_supported()


def _fbgemm_pack(q: torch.Tensor, scale: torch.Tensor) -> torch.ScriptObject:
    zero_points = torch.zeros(q.shape[0], dtype=torch.long)
    with warnings.catch_warnings():  # quantized tensors are deprecated as a user type; fbgemm still takes one
        warnings.simplefilter("ignore", UserWarning)
        weight = torch._make_per_channel_quantized_tensor(q.contiguous(), scale.double(), zero_points, 0)
    return torch.ops.quantized.linear_prepack(weight, None)


class Int4Weight(PackedWeight):
    """Asymmetric int4 in groups of 32 along the input: w = q * scale + low, q in 0..15.

    A GGUF Q4_0/Q4_1/Q4_K block holds the same kind of code (one scale and offset per 32
    weights), so those weights repack onto (nearly) the same grid. Two copies of the codes are
    kept: PyTorch's int4 kernel layout, and the tile layout of inductor's AMX template
    (thrifty.quant.int4_tiles), which compiled batch steps on CPUs with AMX read and prefill
    expands to bfloat16.
    """

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, low: torch.Tensor) -> None:
        self.out_features = q.shape[0]
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)
        self.tiles = to_tiles(q)  # [N, K/2]
        self.scale = scale.to(torch.bfloat16).contiguous()  # [N, K/32]
        self.low = low.to(torch.bfloat16).contiguous()
        # The kernel computes (q - 8) * scale + zero, so its zero is low + 8 * scale.
        zero = self.low.float() + 8 * self.scale.float()
        self.scales_and_zeros = torch.stack([self.scale.float().t(), zero.t()], dim=-1).to(torch.bfloat16).contiguous()

    @staticmethod
    def supports(shape: tuple[int, ...]) -> bool:
        return len(shape) == 2 and shape[1] % INT4_GROUP == 0 and shape[0] % TILE_N == 0

    @classmethod
    def from_float(cls, w: torch.Tensor) -> Int4Weight:
        n, k = w.shape
        groups = w.float().reshape(n, k // INT4_GROUP, INT4_GROUP)
        low, high = groups.amin(-1), groups.amax(-1)
        scale = ((high - low) / 15).clamp(min=1e-12).to(torch.bfloat16).float()
        low = low.to(torch.bfloat16).float()
        q = torch.round((groups - low[..., None]) / scale[..., None]).clamp(0, 15).to(torch.uint8).reshape(n, k)
        return cls(q, scale, low)

    def codes(self) -> torch.Tensor:
        """The codes q [N, K] (uint8, 0..15)."""
        n, k = self.out_features, self.tiles.shape[1] * 2
        return codes_into(self.tiles, torch.empty(n, k, dtype=torch.uint8, device=self.tiles.device))

    def _dense_bf16(self) -> torch.Tensor:
        n, k = self.out_features, self.tiles.shape[1] * 2
        # Codes straight into the bfloat16 result, then scaled in place: cheaper than converting a copy.
        w = codes_into(self.tiles, torch.empty(n, k, dtype=torch.bfloat16, device=self.tiles.device))
        groups = w.view(n, -1, INT4_GROUP)
        groups.mul_(self.scale[..., None]).add_(self.low[..., None])
        return w

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        xb = x.to(torch.bfloat16)
        if use_tiles(x.shape[0]):  # a compiled batch step: inductor's AMX template
            y = int4_tiles_mm(xb, self.tiles, INT4_GROUP, self.scales_and_zeros)
        elif x.shape[0] <= DENSE_ROWS["int4"]:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, self.packed, INT4_GROUP, self.scales_and_zeros)
        else:
            dense = self._dense_bf16()
            y = with_padded_rows(lambda rows: F.linear(rows, dense), xb)
        return _finish(y, bias, x.dtype)

    def dequantize(self) -> torch.Tensor:
        return self._dense_bf16().float()

    @property
    def nbytes(self) -> int:
        return (self.packed.nbytes + self.tiles.nbytes + self.scale.nbytes + self.low.nbytes
                + self.scales_and_zeros.nbytes)


FORMATS: dict[str, type[PackedWeight]] = {"bf16": BF16Weight, "int8": Int8Weight, "int4": Int4Weight}


def pack(w: torch.Tensor, fmt: str) -> PackedWeight:
    """Pack a dense weight; int4 falls back to int8 for shapes the int4 kernel cannot take."""
    if fmt == "int4" and not Int4Weight.supports(tuple(w.shape)):
        fmt = "int8"
    if w.shape[0] <= PACK_ROWS:
        return FORMATS[fmt].from_float(w)
    parts = []
    for rows in w.split(PACK_ROWS):
        parts.append(FORMATS[fmt].from_float(rows))
        release_free_memory()  # the slice's float scratch, before the next slice lands beside it
    return concat(parts)


def pack_rows(rows: Callable[[int, int], torch.Tensor], shape: tuple[int, int], fmt: str) -> PackedWeight:
    """Pack a weight given as float rows [start, stop) on demand: as `pack` on the whole, one slice
    of PACK_ROWS rows in memory at a time."""
    if fmt == "int4" and not Int4Weight.supports(shape):
        fmt = "int8"
    parts = []
    for start in range(0, shape[0], PACK_ROWS):
        parts.append(FORMATS[fmt].from_float(rows(start, min(start + PACK_ROWS, shape[0]))))
        release_free_memory()
    return parts[0] if len(parts) == 1 else concat(parts)


def concat(parts: list[PackedWeight]) -> PackedWeight:
    """The weights stacked along the output dimension (for fused projections), in one format.

    Parts in different formats (a GGUF file may mix block types) are repacked into the most
    precise of them.
    """
    kinds = {type(p) for p in parts}
    if kinds == {Int8Weight}:
        return Int8Weight(torch.cat([p.q for p in parts]), torch.cat([p.scale for p in parts]))
    if kinds == {BF16Weight}:
        return BF16Weight(torch.cat([p.w for p in parts]))
    if kinds == {Int4Weight}:
        return Int4Weight(torch.cat([p.codes() for p in parts]), torch.cat([p.scale for p in parts]),
                          torch.cat([p.low for p in parts]))
    finest = next(fmt for fmt, cls in FORMATS.items() if cls in kinds)  # FORMATS runs most precise first
    return pack(torch.cat([p.dequantize() for p in parts]), finest)

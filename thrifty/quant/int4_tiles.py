"""Int4 codes in the tile layout of inductor's AMX int4 GEMM, and an op that multiplies by them.

With max-autotune, inductor can lower an int4 weight-only matmul to a C++ GEMM template. Where the
row count is dynamic (a compiled batch step) the template runs an AMX micro-kernel, which
reads the codes in its own layout: per TILE_N output features and per input feature, TILE_N / 2
bytes whose low nibbles hold the first half of the features and whose high nibbles the second
([N / TILE_N, K, TILE_N / 2], kept as [N, K / 2]). On a 2-core Sapphire Rapids its 16-row calls
took 0.15 ms against 0.44 for PyTorch's int4 kernel on SmolLM2's gate/up weight, about what one
row costs (BENCHMARKS.md, Speed, "A new machine: Intel Sapphire Rapids with AMX").

`thrifty::int4_tiles_mm(x, tiles, group_size, scales_and_zeros)` is x W^T for W in that layout,
with the scales and zeros of `_weight_int4pack_mm_for_cpu` (w = (q - 8) * scale + zero per
group). The compiled `batch_tiles` graph calls it (traced inside `traced_with_tiles()`),
and thrifty.engine.gemm_templates lowers it to the template and only to it. Its eager
implementation dequantizes and multiplies: correct, slow, and run only by checks and by graphs
that were not built that way.

The template rounds differently from PyTorch's int4 kernel, which gives a row the same result
whatever the other rows; speculative verify steps rely on that (a sequence's verify rows must
compute what its plain steps would), so only batches of sequences that do not speculate use it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F

TILE_N = 32  # output features per tile of the AMX micro-kernel (its block_n)
_tiles_enabled = False


def to_tiles(q: torch.Tensor) -> torch.Tensor:
    """Codes q [N, K] (0..15) into the tile layout [N, K / 2]; N must be a multiple of TILE_N."""
    n, k = q.shape
    blocks = q.to(torch.uint8).view(n // TILE_N, TILE_N, k).transpose(1, 2)  # [N / TILE_N, K, TILE_N]
    half = TILE_N // 2
    return (blocks[..., :half] | (blocks[..., half:] << 4)).contiguous().view(n, k // 2)


def codes_into(tiles: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Write the codes held in `tiles` into `out` [N, K] (any dtype): the same values `to_tiles` took."""
    n, k = out.shape
    packed = tiles.view(n // TILE_N, k, TILE_N // 2)
    blocks = torch.cat((packed & 15, packed >> 4), dim=-1)  # [N / TILE_N, K, TILE_N]
    # Transposed in bytes, then converted in one pass: faster than writing `out` through a transposed view.
    return out.copy_(blocks.transpose(1, 2).contiguous().view(n, k))


_LIBRARY = torch.library.Library("thrifty", "FRAGMENT")
_LIBRARY.define("int4_tiles_mm(Tensor x, Tensor tiles, int group_size, Tensor scales_and_zeros) -> Tensor")


def _int4_tiles_mm(x: torch.Tensor, tiles: torch.Tensor, group_size: int,
                   scales_and_zeros: torch.Tensor) -> torch.Tensor:
    n, k = tiles.shape[0], tiles.shape[1] * 2
    q = codes_into(tiles, torch.empty(n, k, dtype=torch.float32, device=tiles.device))
    scale, zero = scales_and_zeros.float().unbind(-1)  # each [K / group, N]
    w = (q.view(n, -1, group_size) - 8) * scale.t()[..., None] + zero.t()[..., None]
    return F.linear(x.float(), w.view(n, k)).to(x.dtype)


_LIBRARY.impl("int4_tiles_mm", _int4_tiles_mm, "CPU")


@torch.library.register_fake("thrifty::int4_tiles_mm")
def _shape(x: torch.Tensor, tiles: torch.Tensor, group_size: int, scales_and_zeros: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], tiles.shape[0])


def int4_tiles_mm(x: torch.Tensor, tiles: torch.Tensor, group_size: int,
                  scales_and_zeros: torch.Tensor) -> torch.Tensor:
    """x [M, K] (bfloat16) times the tiled int4 weight [N, K / 2]: [M, N] in x's dtype."""
    return torch.ops.thrifty.int4_tiles_mm(x, tiles, group_size, scales_and_zeros)


@contextlib.contextmanager
def traced_with_tiles(enabled: bool = True) -> Iterator[None]:
    """While a graph is traced inside: its int4 matmuls of a symbolic row count call `int4_tiles_mm`."""
    global _tiles_enabled
    saved, _tiles_enabled = _tiles_enabled, enabled
    try:
        yield
    finally:
        _tiles_enabled = saved


def use_tiles(rows: int | torch.SymInt) -> bool:
    """Whether an int4 matmul of `rows` rows, being traced now, calls `int4_tiles_mm`."""
    return _tiles_enabled and torch.compiler.is_compiling() and not isinstance(rows, int) and amx_available()


def amx_available() -> bool:
    """Whether this CPU has AMX tiles, which the template's micro-kernel for the tile layout needs."""
    return bool(torch.cpu._is_amx_tile_supported())

"""float32 matmuls through a oneDNN-blocked weight copy, as an op that compiled graphs can call.

Used where thrifty's own few-row kernel (thrifty.models.skinny_linear) cannot run: CPUs without
AVX-512, or no C++ compiler.

oneDNN's matmul on a copy of the weight reordered into its blocked layout beats the plain-layout
matmuls from 3-4 rows on (thrifty.models.layers). The copy is an opaque tensor: it has no strides
or storage, so torch.export cannot take it as an input of a compiled graph. The op
`thrifty::blocked_linear(x, weight)` takes the plain weight instead and finds its blocked copy in
a registry keyed by the weight's data pointer and shape. AOTInductor calls it through its proxy
executor (the dispatcher and this module's Python, about 30 microseconds a call), so a compiled
verify step of a float32 model fuses its norms, RoPE and attention glue and still gets the blocked
matmuls. The graph's row count is symbolic, so the op makes the eager step's choice by rows at run
time (thrifty.models.layers.dense_linear): below a few rows, the plain layout.

A weight with no registered copy (freed, or never blocked) is multiplied in its plain layout: slower,
never wrong.
"""

from __future__ import annotations

import weakref

import torch

_BLOCKED: dict[tuple[int, tuple[int, ...]], torch.Tensor] = {}

_LIBRARY = torch.library.Library("thrifty", "DEF")
_LIBRARY.define("blocked_linear(Tensor x, Tensor weight) -> Tensor")


def _key(weight: torch.Tensor) -> tuple[int, tuple[int, ...]]:
    return weight.data_ptr(), tuple(weight.shape)


def register(weight: torch.Tensor, blocked: torch.Tensor) -> None:
    """Make `blocked` the copy `blocked_linear` uses for `weight`, for as long as `weight` lives."""
    key = _key(weight)
    _BLOCKED[key] = blocked
    # The entry goes with the weight: a later tensor at the same address must not find this copy.
    weakref.finalize(weight, _BLOCKED.pop, key, None)


def _blocked_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    # The graph's row count is symbolic, so the choice by rows that eager steps make is made here, at
    # run time: a verify step of 2-3 rows is faster in the plain layout on some CPUs (1.3x on Intel).
    from thrifty.models.layers import dense_linear  # layers imports this module

    return dense_linear(x, weight, None, _BLOCKED.get(_key(weight)))


_LIBRARY.impl("blocked_linear", _blocked_linear, "CPU")


@torch.library.register_fake("thrifty::blocked_linear")
def _shape(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def blocked_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight^T through the weight's registered blocked copy."""
    return torch.ops.thrifty.blocked_linear(x, weight)

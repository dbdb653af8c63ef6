"""Large matmuls run on a few row counts: the rows are padded up to the next of a few steps.

oneDNN compiles a primitive for every distinct matmul shape it meets and keeps it for the life of
the process (up to 1,024 of them, a few hundred KB each for SmolLM2's layers). Prefill chunks
come in whatever row count a prompt's length leaves for its last chunk, so a server's RSS crept
up with every new prompt length. Above 64 rows the count is rounded up to a step of 1/8 of its
power of two (8 sizes per doubling: 72, 80, ..., 128, 144, ..., 512), so one weight sees at most
about 25 shapes between 65 and 512 rows, and the zero rows added cost under 12.5% of a call
(about 3% on average).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

PAD_ABOVE = 64  # fewer rows (decode batches, speculative verification) come in few counts anyway


def padded_rows(rows: int) -> int:
    if rows <= PAD_ABOVE:
        return rows
    step = 1 << (rows.bit_length() - 4)
    return -(-rows // step) * step


def with_padded_rows(matmul: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """matmul(x) for x [..., in], computed on rows padded with zeros to `padded_rows`."""
    rows = x.numel() // x.shape[-1]
    padded = rows if torch.compiler.is_compiling() else padded_rows(rows)
    if padded == rows:
        return matmul(x)
    flat = F.pad(x.reshape(rows, x.shape[-1]), (0, 0, 0, padded - rows))
    y = matmul(flat)[:rows]
    return y.reshape(*x.shape[:-1], y.shape[-1])

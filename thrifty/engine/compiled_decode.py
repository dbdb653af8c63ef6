"""torch.compile of plain decoding steps, layer by layer, with a warm-up and an eager fallback.

A batch-1 decode step of a small model is about a thousand small eager ops (norms, casts, RoPE,
cache gathers), each paying Python and dispatcher overhead; inductor fuses the elementwise ones
into a few C++ loops and calls the matmul and attention kernels (the packed int4/int8 ones
included) as extern kernels. Compilation is regional: one compiled function runs every decoder
layer, so Dynamo traces and inductor compiles one layer, not all of them (about 10x less compile
time than the whole body, for most of its speed-up). There is one graph for a single sequence
and one for several, with batch size and context length dynamic; a batch past the row limits of
the matmul kernels (thrifty.quant.packed.DENSE_ROWS) takes another path and compiles on first use.
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn

from thrifty.models.base import CausalLM, Metadata, call_layer
from thrifty.models.decode_attention import DecodeMetadata

log = logging.getLogger(__name__)

# One compiled function for every layer of every model: Dynamo keys its cache on this code object
# and guards on the layer's structure, not its identity, so identical layers share one graph.
_compiled_layer = torch.compile(call_layer)


class CompiledDecode:
    """Runs `model.body` for DecodeMetadata steps with compiled layers; eagerly after any failure."""

    def __init__(self, model: CausalLM) -> None:
        self.model = model
        self.error: str | None = None  # why it fell back to eager, once it has

    def __call__(self, x: torch.Tensor, positions: torch.Tensor, meta: DecodeMetadata) -> torch.Tensor:
        if x.shape[0] != meta.slot_ids.shape[0]:
            # Several new tokens a sequence (verify steps) run eagerly: compiled, a float32 target's
            # multi-row matmuls lose the oneDNN-blocked path (a 6-row verify step took 51 ms against 41).
            return self.model.body(x, positions, meta)
        if self.error is None:
            # Dynamic dimensions instead of one graph per context length (and batch size, past 1).
            torch._dynamo.maybe_mark_dynamic(meta.slot_ids, 1)
            if x.shape[0] > 1:
                torch._dynamo.maybe_mark_dynamic(meta.allowed, 2)  # the context length again
                for t in (x, positions, meta.slot_mapping, meta.slot_ids, meta.query_slots, meta.allowed):
                    torch._dynamo.maybe_mark_dynamic(t, 0)
        return self.model.body(x, positions, meta, self._run_layer)

    def _run_layer(self, layer: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   meta: Metadata) -> torch.Tensor:
        if self.error is None:
            try:
                return _compiled_layer(layer, x, cos, sin, meta)
            except Exception as exc:  # noqa: BLE001 - a compiler failure must leave a working engine
                # A failed run may have written this layer's K/V already; the eager run writes the same.
                self.error = f"{type(exc).__name__}: {exc}"
                log.warning("torch.compile of the decode step failed; running eagerly: %s", self.error)
        return call_layer(layer, x, cos, sin, meta)

    def warm_up(self, block_size: int, device: torch.device) -> float:
        """Compile the single-sequence and the batched graph now; return the seconds it took.

        The dummy steps write K/V into the first slots of the pool, which no sequence holds yet
        (call it before serving), and every slot is written before it is read.
        """
        start = time.perf_counter()
        with torch.inference_mode():
            for batch in (1, 2):
                meta = DecodeMetadata.build([[0, 1]] * batch, [2] * batch, block_size, device)
                x = self.model.embed(torch.zeros(batch, dtype=torch.long, device=device))
                self(x, torch.ones(batch, dtype=torch.long, device=device), meta)
        return time.perf_counter() - start

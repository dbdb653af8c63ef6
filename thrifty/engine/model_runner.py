"""Runs one scheduled step through the model: builds the flat batch and returns next-token logits."""

from __future__ import annotations

from collections.abc import Callable

import torch

from thrifty.engine.scheduler import ScheduledSequence
from thrifty.engine.sequence import Sequence
from thrifty.kv.quant.lowbit import LowPrecisionTokens
from thrifty.models.paged_attention import (
    AttentionMetadata,
    AttentionObserver,
    LayerLengths,
    SequenceSlice,
)

# What the KV policy of a sequence asks of attention this step: an observer, per-layer lengths, demoted tokens.
KVHooks = tuple[AttentionObserver | None, LayerLengths | None, LowPrecisionTokens | None]


class ModelRunner:
    def __init__(self, model: torch.nn.Module, block_size: int, device: torch.device,
                 kv_hooks_for: Callable[[Sequence], KVHooks] | None = None) -> None:
        self.model = model
        self.kv_hooks_for = kv_hooks_for  # KV policies hook into attention here
        self.block_size = block_size
        self.device = device
        self._slot_offsets = torch.arange(block_size, device=device)

    def _slots(self, block_table: list[int], num_slots: int) -> torch.Tensor:
        table = torch.tensor(block_table, dtype=torch.long, device=self.device)
        return (table[:, None] * self.block_size + self._slot_offsets).flatten()[:num_slots]

    @torch.inference_mode()
    def execute(self, batch: list[ScheduledSequence]) -> torch.Tensor:
        """Compute this step's tokens; return float32 logits, one row per sequence whose chunk completes
        (1 + len(draft) rows, one per tree node, for a sequence with a speculative draft).

        The scheduler has already reserved KV slots for the new tokens, so for each sequence
        they are the last `num_tokens` of its `num_cached_slots`.
        """
        input_ids: list[int] = []
        positions: list[int] = []
        slices: list[SequenceSlice] = []
        new_slots: list[torch.Tensor] = []
        sample_rows: list[int] = []
        for item in batch:
            seq, n = item.seq, item.num_query_tokens
            start = seq.num_computed_tokens
            input_ids.extend(seq.token_ids[start:start + item.num_tokens])
            positions.extend(range(start, start + item.num_tokens))
            tree_mask = None
            if item.draft is not None:  # speculative tokens after the last real one, one logits row each
                input_ids.extend(item.draft.token_ids)
                positions.extend(start + depth for depth in item.draft.depths)
                tree_mask = item.draft.tree_mask()
            slot_ids = self._slots(seq.block_table, seq.num_cached_slots)
            observer, lengths, demoted = self.kv_hooks_for(seq) if self.kv_hooks_for else (None, None, None)
            slices.append(SequenceSlice(query_start=len(input_ids) - n, query_len=n,
                                        context_len=seq.num_cached_slots, slot_ids=slot_ids, tree_mask=tree_mask,
                                        observer=observer, layer_lengths=lengths, demoted=demoted))
            new_slots.append(slot_ids[-n:])
            if item.completes:
                sample_rows.extend(range(len(input_ids) - 1 - n + item.num_tokens, len(input_ids)))
        meta = AttentionMetadata(slot_mapping=torch.cat(new_slots), sequences=slices)
        hidden = self.model(torch.tensor(input_ids, dtype=torch.long, device=self.device),
                            torch.tensor(positions, dtype=torch.long, device=self.device), meta)
        rows = torch.tensor(sample_rows, dtype=torch.long, device=self.device)
        return self.model.compute_logits(hidden.index_select(0, rows)).float().cpu()

"""Runs one scheduled step through the model: builds the flat batch and returns next-token logits."""

from __future__ import annotations

import torch

from thrifty.engine.scheduler import ScheduledSequence
from thrifty.models.paged_attention import AttentionMetadata, SequenceSlice


class ModelRunner:
    def __init__(self, model: torch.nn.Module, block_size: int, device: torch.device) -> None:
        self.model = model
        self.block_size = block_size
        self.device = device
        self._slot_offsets = torch.arange(block_size, device=device)

    def _slots(self, block_table: list[int], num_slots: int) -> torch.Tensor:
        table = torch.tensor(block_table, dtype=torch.long, device=self.device)
        return (table[:, None] * self.block_size + self._slot_offsets).flatten()[:num_slots]

    @torch.inference_mode()
    def execute(self, batch: list[ScheduledSequence]) -> torch.Tensor:
        """Compute this step's tokens; return float32 logits, one row per sequence whose chunk completes.

        The scheduler has already reserved KV slots for the new tokens, so for each sequence
        they are the last `num_tokens` of its `num_cached_slots`.
        """
        input_ids: list[int] = []
        positions: list[int] = []
        slices: list[SequenceSlice] = []
        new_slots: list[torch.Tensor] = []
        sample_rows: list[int] = []
        for item in batch:
            seq, n = item.seq, item.num_tokens
            start = seq.num_computed_tokens
            input_ids.extend(seq.token_ids[start:start + n])
            positions.extend(range(start, start + n))
            slot_ids = self._slots(seq.block_table, seq.num_cached_slots)
            slices.append(SequenceSlice(query_start=len(input_ids) - n, query_len=n,
                                        context_len=seq.num_cached_slots, slot_ids=slot_ids))
            new_slots.append(slot_ids[-n:])
            if item.completes:
                sample_rows.append(len(input_ids) - 1)
        meta = AttentionMetadata(slot_mapping=torch.cat(new_slots), sequences=slices)
        hidden = self.model(torch.tensor(input_ids, dtype=torch.long, device=self.device),
                            torch.tensor(positions, dtype=torch.long, device=self.device), meta)
        rows = torch.tensor(sample_rows, dtype=torch.long, device=self.device)
        return self.model.compute_logits(hidden.index_select(0, rows)).float().cpu()

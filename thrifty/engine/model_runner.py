"""Runs one scheduled step through the model: builds the flat batch and returns next-token logits."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from thrifty.engine.compiled_decode import CompiledDecode, ModelRecipe
from thrifty.engine.scheduler import ScheduledSequence
from thrifty.engine.sequence import Sequence
from thrifty.kv.quant.lowbit import LowPrecisionTokens
from thrifty.loading.memory import release_free_memory
from thrifty.models.base import CausalLM
from thrifty.models.decode_attention import DecodeMetadata
from thrifty.models.paged_attention import (
    AttentionMetadata,
    AttentionObserver,
    LayerLengths,
    SequenceSlice,
)

log = logging.getLogger(__name__)

# What the KV policy of a sequence asks of attention this step: an observer, per-layer lengths, demoted tokens.
KVHooks = tuple[AttentionObserver | None, LayerLengths | None, LowPrecisionTokens | None]

# After a step that computed at least this many prompt tokens (prefill chunks, of one prompt or of
# several) the allocator's free pages go back to the OS: a chunk's activations and attention blocks
# come in sizes no later step reuses exactly, and glibc kept them resident (about 20 MB of peak RSS
# in `bench speed`). The next step faults its pages in again (about 5% of a prefill chunk), which
# decode and speculative verify steps (one real token per sequence, the rest draft rows) skip.
_RELEASE_AFTER_TOKENS = 256
# Sequences reading this many new tokens or fewer each (and sampling only the last) run as decode
# rows: a model drafter's first pass after an accepted draft reads two.
_DECODE_MAX_TOKENS = 8


def prompt_tokens(batch: list[ScheduledSequence]) -> int:
    """Prompt tokens a step computes: chunks of more than one real token (a decoding sequence
    computes one, plus its draft rows when it verifies)."""
    return sum(item.num_tokens for item in batch if item.num_tokens > 1)


class ModelRunner:
    def __init__(self, model: CausalLM, block_size: int, device: torch.device,
                 kv_hooks_for: Callable[[Sequence], KVHooks] | None = None) -> None:
        self.model = model
        self.kv_hooks_for = kv_hooks_for  # KV policies hook into attention here
        self.block_size = block_size
        self.device = device
        self._slot_offsets = torch.arange(block_size, device=device)
        # Plain decoding steps take the tensor-only DecodeMetadata path (compiled when asked for);
        # soft-capped attention logits (Gemma 2 style) have no kernel there.
        self._decode_path = model.config.attn_logit_softcapping is None
        self.decode_body: Callable[[torch.Tensor, torch.Tensor, DecodeMetadata], torch.Tensor] = model.body
        # Whether a sequence speculates: its plain steps must then round as its verify steps will, so
        # a compiled batch step holding it avoids kernels whose rows depend on the batch (set by the engine).
        self.speculates: Callable[[Sequence], bool] = lambda seq: False

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
        no_hooks: KVHooks = (None, None, None)
        hooks = [self.kv_hooks_for(item.seq) if self.kv_hooks_for else no_hooks for item in batch]
        query_len = self._decode_query_len(batch, hooks)
        if query_len is not None:
            return self._execute_decode(batch, query_len)
        input_ids: list[int] = []
        positions: list[int] = []
        slices: list[SequenceSlice] = []
        new_slots: list[torch.Tensor] = []
        sample_rows: list[int] = []
        for item, (observer, lengths, demoted) in zip(batch, hooks):
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
        logits = self.model.compute_logits(hidden.index_select(0, rows)).float().cpu()
        if prompt_tokens(batch) >= _RELEASE_AFTER_TOKENS and self.device.type == "cpu":
            del hidden
            release_free_memory()
        return logits

    def compile_decode(self, recipe: ModelRecipe) -> None:
        """Run plain decoding steps through AOTInductor graphs from now on (built now, or found in the
        cache); `recipe` says how the model was loaded, for the build in a child process."""
        if not self._decode_path:
            log.warning("compiled decode steps not used: this model's attention has no plain decoding path")
            return
        compiled = CompiledDecode(self.model, recipe)
        seconds = compiled.load()
        log.info("compiled decode steps ready in %.1fs%s", seconds,
                 f" (running eagerly: {compiled.error})" if compiled.error else "")
        self.decode_body = compiled

    def _decode_query_len(self, batch: list[ScheduledSequence], hooks: list[KVHooks]) -> int | None:
        """Q when every sequence computes Q new tokens (Q = 1 in plain decoding) and samples from
        them, with nothing else asked of attention (no tree, no KV policy hooks): either one token
        and a chain draft of Q - 1 (a verify step), or, for all of them, Q uncomputed tokens (a
        drafter reading the last accepted tokens). None when the step needs the general path."""
        if not self._decode_path or not batch:
            return None
        query_len = batch[0].num_query_tokens
        drafted = batch[0].draft is not None
        for item in batch:
            if item.num_query_tokens != query_len or (item.draft is not None) != drafted or not item.completes:
                return None
            if item.draft is not None and (item.num_tokens != 1 or not item.draft.is_chain):
                return None
        if not drafted and query_len > _DECODE_MAX_TOKENS:
            return None
        if any(hook is not None for item_hooks in hooks for hook in item_hooks):
            return None
        return query_len

    def _execute_decode(self, batch: list[ScheduledSequence], query_len: int) -> torch.Tensor:
        seqs = [item.seq for item in batch]
        meta = DecodeMetadata.build([s.block_table for s in seqs], [s.num_cached_slots for s in seqs],
                                    self.block_size, self.device, query_len)
        input_ids: list[int] = []
        for item in batch:  # each sequence's new tokens, then its draft
            start = item.seq.num_computed_tokens
            input_ids.extend(item.seq.token_ids[start:start + item.num_tokens])
            input_ids.extend(item.draft.token_ids if item.draft else ())
        positions = torch.tensor([s.num_computed_tokens for s in seqs], dtype=torch.long, device=self.device)
        positions = (positions[:, None] + torch.arange(query_len, device=self.device)).flatten()
        embeds = self.model.embed(torch.tensor(input_ids, dtype=torch.long, device=self.device))
        if isinstance(self.decode_body, CompiledDecode):
            hidden = self.decode_body(embeds, positions, meta, exact=any(self.speculates(s) for s in seqs))
        else:
            hidden = self.decode_body(embeds, positions, meta)
        if batch[0].draft is None and query_len > 1:  # only each sequence's last token is sampled
            hidden = hidden[query_len - 1::query_len]
        return self.model.compute_logits(hidden).float().cpu()

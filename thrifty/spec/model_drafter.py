"""Drafting with a small causal LM: a separate draft model, or the target itself with layers skipped.

The drafter keeps its own paged KV pool and, per target sequence, a shadow sequence of
what it has computed. Each step it (1) syncs the shadow with the target's tokens: the
prefix both agree on is kept and the rest, such as draft tokens the target rejected, is
rolled back with `BlockManager.truncate`; (2) computes the tokens it has not seen (the
whole prompt the first time, the accepted tokens and the target's own token afterwards);
(3) drafts greedily, one batched forward pass per draft token for all sequences at once.
Greedy drafts are deterministic, so verification treats them like any other proposer's
(one-hot draft distribution) and stays lossless for sampling too.

A drafter whose layers mirror the target's (the target's own file in a cheaper run format, or
a layer-skip view) does not read a new prompt at all: it copies the target's keys and values
for it (`TargetKV`), as layer-skip self-speculation shares the target's cache. Its drafts are
then computed over the target's view of the prompt, which can only help them (verification
keeps the output exact either way), and a new sequence costs no catch-up: on a CPU reading a
chat prompt with an int4 drafter cost 0.1-0.4 s, as much as the drafts could save.
"""

from __future__ import annotations

import dataclasses
import time

import torch

from thrifty.engine.model_runner import ModelRunner
from thrifty.engine.scheduler import ScheduledSequence
from thrifty.engine.sequence import Sequence
from thrifty.kv.blocks import BlockManager
from thrifty.kv.cache import KVCache
from thrifty.kv.quant import LayerKV, as_store
from thrifty.models.base import CausalLM
from thrifty.spec.draft import Draft

CATCH_UP_CHUNK = 512  # tokens per forward pass when the drafter first reads a long prompt
CATCH_UP_ABOVE = 8  # more unseen tokens than this (a new or resumed sequence) are read before drafting


@dataclasses.dataclass
class TargetKV:
    """The target's cache, for a drafter whose layer i computes what the target's `layers[i]` does."""

    kv_layers: list[tuple[torch.Tensor | LayerKV, torch.Tensor | LayerKV]]  # the target's, every layer
    blocks: BlockManager  # the target's, for its sequences' slots
    layers: list[int]  # target layer of each drafter layer

    def can_copy(self, seq: Sequence) -> bool:
        # After a KV policy evicted some of its tokens a sequence's slots no longer line up with positions.
        return seq.num_cached_slots == seq.num_computed_tokens

    def copy(self, seq: Sequence, start: int, stop: int, kv_layers: list, dst: list[int]) -> None:
        """Positions [start, stop) of target sequence `seq` into the drafter's slots `dst`."""
        src = torch.tensor(self.blocks.slot_ids(seq, start, stop))
        dst_ids = torch.tensor(dst)
        for layer, (k_cache, v_cache) in zip(self.layers, kv_layers):
            k, v = as_store(*self.kv_layers[layer]).gather(src.to(k_cache.device))
            as_store(k_cache, v_cache).write(dst_ids.to(k_cache.device), k, v)


class ModelDrafter:
    """A proposer that runs `model` (any thrifty CausalLM sharing the target's vocabulary)."""

    def __init__(self, name: str, model: CausalLM, num_blocks: int, block_size: int,
                 kv_dtype: torch.dtype, device: torch.device, target_kv: TargetKV | None = None) -> None:
        self.name = name
        self.model = model
        self.target_kv = target_kv
        # One cache layer per layer the drafter runs (a layer-skip view runs fewer than its config says).
        config = dataclasses.replace(model.config, num_layers=len(model.model.layers))
        self.kv_cache = KVCache(config, num_blocks, block_size, kv_dtype, device)
        model.bind_kv_cache(self.kv_cache.layers)
        self.blocks = BlockManager(num_blocks, block_size, enable_prefix_caching=False)
        self.runner = ModelRunner(model, block_size, device)
        self.shadows: dict[Sequence, Sequence] = {}  # target sequence -> what the drafter computed
        self.confirmed: dict[Sequence, int] = {}  # target sequence -> its length when last synced
        self.default_draft_tokens = 5
        self.drafts_for_free = False
        self.learns_from_steps = False
        self.seconds_per_pass = 0.0  # running mean of one batched draft pass, for the adaptive controller
        self.catch_up_seconds = 0.0  # spent reading prompts in the last call: a one-off, like prefill
        self.seconds_per_catch_up_token = 0.0  # running mean, to price a sequence's catch-up before it starts

    def propose_batch(self, seqs: list[Sequence], limits: list[int]) -> list[Draft | None]:
        self._forget_finished()
        limit_of = {seq: limit for seq, limit in zip(seqs, limits) if limit > 0}
        shadows = {seq: self._synced_shadow(seq) for seq in limit_of}
        self._catch_up(shadows)
        drafts: dict[Sequence, list[int]] = {seq: [] for seq in limit_of}
        feed = {seq: shadow.num_uncomputed_tokens for seq, shadow in shadows.items()}  # first pass: all unseen
        live = [seq for seq, shadow in shadows.items()
                if 0 < feed[seq] <= CATCH_UP_ABOVE and self._reserve(shadow, feed[seq])]
        started, passes = time.perf_counter(), 0
        while live:
            logits = self.runner.execute([ScheduledSequence(shadows[seq], feed[seq]) for seq in live])
            passes += 1
            for seq, token in zip(live, logits.argmax(dim=-1).tolist()):
                shadows[seq].num_computed_tokens += feed[seq]
                shadows[seq].token_ids.append(token)  # fed in at the next pass, if there is one
                drafts[seq].append(token)
                feed[seq] = 1
            live = [seq for seq in live if len(drafts[seq]) < limit_of[seq] and self._reserve(shadows[seq], 1)]
        if passes:
            per_pass = (time.perf_counter() - started) / passes
            self.seconds_per_pass = per_pass if not self.seconds_per_pass else (
                0.8 * self.seconds_per_pass + 0.2 * per_pass)
        return [Draft.chain(drafts[seq], self.name) if drafts.get(seq) else None for seq in seqs]

    def observe(self, token_ids: list[int], logits: torch.Tensor, preceding: list[int | None]) -> None:
        pass

    def pending_seconds(self, seq: Sequence) -> float:
        if self.target_kv is not None and self.target_kv.can_copy(seq):
            return 0.0
        shadow = self.shadows.get(seq)
        unseen = len(seq.token_ids) - (shadow.num_computed_tokens if shadow is not None else 0)
        return unseen * self.seconds_per_catch_up_token if unseen > CATCH_UP_ABOVE else 0.0

    # -- shadow sequences -------------------------------------------------------------------

    def _synced_shadow(self, seq: Sequence) -> Sequence:
        shadow = self.shadows.get(seq)
        if shadow is None:
            shadow = self.shadows[seq] = Sequence(seq.request_id, seq.index, [], seq.params)
        # The tokens before the last draft are the target's own and stay equal: compare from there.
        limit = min(shadow.num_computed_tokens, len(seq.token_ids) - 1)  # the last token is always fed again
        agree = min(self.confirmed.get(seq, 0), limit)
        while agree < limit and shadow.token_ids[agree] == seq.token_ids[agree]:
            agree += 1
        self.confirmed[seq] = len(seq.token_ids)
        if agree < shadow.num_cached_slots:
            self.blocks.truncate(shadow, agree)
        shadow.num_computed_tokens = agree
        shadow.token_ids = list(seq.token_ids)
        return shadow

    def _reserve(self, shadow: Sequence, num_slots: int) -> bool:
        """Slots for the next `num_slots` tokens; if the pool is full the shadow is dropped (no draft)."""
        if self.blocks.can_append(shadow, num_slots):
            self.blocks.append_slots(shadow, num_slots)
            return True
        self.blocks.free(shadow)
        return False

    def _catch_up(self, shadows: dict[Sequence, Sequence]) -> None:
        """Bring long unseen stretches (a new prompt) up to the last token: copied from the target
        where the drafter mirrors it, else read in chunks."""
        started, read = time.perf_counter(), 0
        pending = [shadow for seq, shadow in shadows.items()
                   if shadow.num_uncomputed_tokens > CATCH_UP_ABOVE and not self._copy_from_target(seq, shadow)]
        while pending:
            chunk = [ScheduledSequence(s, n) for s in pending
                     if self._reserve(s, n := min(s.num_uncomputed_tokens - 1, CATCH_UP_CHUNK))]
            if chunk:
                self.runner.execute(chunk)
            for item in chunk:
                item.seq.num_computed_tokens += item.num_tokens
                read += item.num_tokens
            pending = [item.seq for item in chunk if item.seq.num_uncomputed_tokens > 1]
        self.catch_up_seconds = time.perf_counter() - started
        if read:
            per_token = self.catch_up_seconds / read
            self.seconds_per_catch_up_token = per_token if not self.seconds_per_catch_up_token else (
                0.8 * self.seconds_per_catch_up_token + 0.2 * per_token)

    def _copy_from_target(self, seq: Sequence, shadow: Sequence) -> bool:
        """Copy the target's KV for the shadow's unseen tokens but the last; False if it cannot."""
        target = self.target_kv
        if target is None or not target.can_copy(seq):
            return False
        start, stop = shadow.num_computed_tokens, shadow.num_tokens - 1
        if not self.blocks.can_append(shadow, stop - start):
            return False  # the pool is full: reading it would fail the same way (_reserve drops the shadow)
        target.copy(seq, start, stop, self.kv_cache.layers, self.blocks.append_slots(shadow, stop - start))
        shadow.num_computed_tokens = stop
        return True

    def _forget_finished(self) -> None:
        for seq in [s for s in self.shadows if s.is_finished]:
            self.blocks.free(self.shadows.pop(seq))
            self.confirmed.pop(seq, None)

"""Continuous batching: which sequences run this step and how many tokens each computes.

Each step has a token budget. Running sequences go first (a decode costs one token, an
unfinished prefill continues with a chunk), then waiting sequences are admitted while
budget, sequence slots and KV blocks last. A decoding sequence with a speculative draft
computes 1 + len(draft) tokens (slots reserved for all; the draft is dropped, never a
sequence preempted, when budget or blocks fall short). When a running sequence needs a block and
none is free, the lowest-ranked running sequence is preempted: its blocks are freed and
it goes back to the waiting queue, to be recomputed (prompt plus what it generated)
when it is admitted again.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from thrifty.engine.sequence import Sequence, SequenceStatus
from thrifty.kv.blocks import BlockManager

if TYPE_CHECKING:
    from thrifty.spec.draft import Draft

SCHEDULING_POLICIES = ("fcfs", "priority")


@dataclass
class ScheduledSequence:
    seq: Sequence
    num_tokens: int  # tokens of seq.token_ids the model computes this step
    draft: Draft | None = None  # speculative tokens computed after them (KV slots reserved too)
    accepted_path: list[int] = field(default_factory=list)  # draft nodes verification accepted
    host_seconds: float = 0.0  # time spent verifying the draft, for the speculation cost model

    @property
    def num_query_tokens(self) -> int:
        return self.num_tokens + (len(self.draft) if self.draft else 0)

    @property
    def completes(self) -> bool:
        """Whether this chunk reaches the last token, so the step yields a next token to sample."""
        return self.seq.num_computed_tokens + self.num_tokens == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSequence] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 policy: str = "fcfs") -> None:
        if policy not in SCHEDULING_POLICIES:
            raise ValueError(f"scheduling policy {policy!r} is unknown; use one of {SCHEDULING_POLICIES}")
        self.blocks = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.policy = policy
        # Keep a few blocks spare when admitting, so a new request does not force an immediate preemption.
        self.watermark_blocks = max(1, block_manager.num_blocks // 100)
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def _rank(self, seq: Sequence) -> tuple:
        return seq.sort_key() if self.policy == "priority" else (seq.arrival_time, seq.seq_id)

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        bisect.insort(self.waiting, seq, key=self._rank)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_tokens = min(seq.num_uncomputed_tokens, budget)
            while not self.blocks.can_append(seq, num_tokens):
                victim = self.running[-1]
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                break
            item = ScheduledSequence(seq, num_tokens, self._take_draft(seq, num_tokens, budget))
            self.blocks.append_slots(seq, item.num_query_tokens)
            out.scheduled.append(item)
            budget -= item.num_query_tokens
            i += 1
        if not out.preempted:
            self._admit(out, budget)
        return out

    def _take_draft(self, seq: Sequence, num_tokens: int, budget: int) -> Draft | None:
        """The sequence's draft if it decodes this step and budget and free blocks allow (never preempts)."""
        draft, seq.draft = seq.draft, None
        if draft is None or seq.num_uncomputed_tokens != 1 or num_tokens + len(draft) > budget:
            return None
        return draft if self.blocks.can_append(seq, num_tokens + len(draft)) else None

    def _admit(self, out: SchedulerOutput, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            cached = self.blocks.claim_cached_prefix(seq)
            num_tokens = min(seq.num_uncomputed_tokens, budget)
            spare = self.watermark_blocks if self.running else 0
            if self.blocks.new_blocks_needed(seq, num_tokens) + spare > self.blocks.num_free_blocks:
                self.blocks.free(seq)
                break
            self.blocks.append_slots(seq, num_tokens)
            self.waiting.pop(0)
            if seq.num_preemptions == 0:
                seq.num_prefix_cache_hits = cached
            seq.status = SequenceStatus.RUNNING
            bisect.insort(self.running, seq, key=self._rank)
            out.scheduled.append(ScheduledSequence(seq, num_tokens))
            budget -= num_tokens

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq)
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.add(seq)

    def finish(self, seq: Sequence) -> None:
        """Take a finished (or aborted) sequence out of the queues and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq)

"""Speculative decoding inside continuous batching: the engine's only entry into thrifty/spec.

Per step: `propose` gives each decoding sequence a draft (or none) before scheduling;
the scheduler reserves KV slots for it and the model runner feeds it in with the real
token, returning logits for every draft node; `sample` verifies drafts (and samples
plain sequences); `settle` keeps the accepted tokens' KV and rolls back the rest.
"""

from __future__ import annotations

import time
import weakref
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from thrifty.engine.sampler import Sampler, TokenLogprob
from thrifty.engine.scheduler import ScheduledSequence
from thrifty.engine.sequence import Sequence
from thrifty.errors import InvalidRequestError
from thrifty.kv.blocks import BlockManager
from thrifty.kv.quant import copy_slots
from thrifty.spec.adaptive import AdaptiveDraftLength, StepCostModel
from thrifty.spec.draft import Draft, Proposer
from thrifty.spec.history import HistoryProposer
from thrifty.spec.ngram import NgramProposer
from thrifty.spec.verify import verify

LOOKUP_PROPOSERS: dict[str, Callable[[], Proposer]] = {"ngram": NgramProposer, "history": HistoryProposer}
MODEL_PROPOSERS = ("draft", "layerskip")  # built by the engine, which owns the models
PROPOSERS = (*LOOKUP_PROPOSERS, *MODEL_PROPOSERS)
PAYBACK_TOKENS = 256  # horizon over which a drafter's catch-up must pay for itself when max_tokens is unset
OFF = "off"


@dataclass
class _DryDraft:
    """What a free proposer would have drafted for a plainly decoding sequence, scored as tokens arrive."""

    draft: Draft
    node: int = 0  # the draft node the generated tokens have followed so far (0: the root)


class Speculator:
    def __init__(self, block_manager: BlockManager, kv_layers: list[tuple[torch.Tensor, torch.Tensor]],
                 eos_token_ids: list[int], max_model_len: int, default_method: str | None = None,
                 num_speculative_tokens: int | None = None, adaptive: bool = True,
                 model_drafters: dict[str, Callable[[], Proposer]] | None = None) -> None:
        self.blocks = block_manager
        self.kv_layers = kv_layers
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len
        self.default_method = default_method
        self.num_speculative_tokens = num_speculative_tokens
        self.proposers: dict[str, Proposer] = {name: make() for name, make in LOOKUP_PROPOSERS.items()}
        self._drafter_factories = dict(model_drafters or {})  # model drafters load on first use
        # Shared pools learn from every sequence's steps, but only once the engine default or some
        # request has asked for them: until then that work (a topk over each step's logits and dict
        # updates, ~2% of a step) would be spent for nobody.
        self._learning: set[str] = set()
        if default_method in self.proposers and self.proposers[default_method].learns_from_steps:
            self._learning.add(default_method)
        # Host seconds per drafted sequence (proposing, verifying, settling), by proposer: what a
        # draft costs besides the forward passes, so the controller can tell when it does not pay.
        self.propose_seconds: dict[str, float] = {}
        self.verify_seconds: dict[str, float] = {}
        self.cost = StepCostModel()
        self.adaptive = AdaptiveDraftLength(self.cost) if adaptive else None
        self.counts: dict[str, dict[str, int]] = defaultdict(lambda: {"drafts": 0, "draft_tokens": 0,
                                                                      "accepted_tokens": 0})
        self._dry: weakref.WeakKeyDictionary[Sequence, _DryDraft] = weakref.WeakKeyDictionary()

    def method(self, seq: Sequence) -> str | None:
        """The proposer `seq` drafts with, None if it does not speculate."""
        method = seq.params.speculative or self.default_method
        return None if method == OFF else method

    def proposer(self, method: str) -> Proposer:
        """The proposer called `method`, building a model drafter the first time it is asked for."""
        if method not in self.proposers:
            if method not in self._drafter_factories:
                raise InvalidRequestError(f"speculative method {method!r} is not available in this engine; use one "
                                          f"of {', '.join([*self.proposers, *self._drafter_factories])} or off")
            self.proposers[method] = self._drafter_factories[method]()
        if self.proposers[method].learns_from_steps:
            self._learning.add(method)
        return self.proposers[method]

    def _draft_costs(self, method: str) -> tuple[float, float]:
        """(seconds per draft token, fixed seconds per draft) of a proposer, as measured so far."""
        proposer = self.proposers.get(method)
        per_token = proposer.seconds_per_pass if proposer is not None else 0.0
        return per_token, self.propose_seconds.get(method, 0.0) + self.verify_seconds.get(method, 0.0)

    # -- before scheduling ----------------------------------------------------------------------

    def propose(self, running: list[Sequence]) -> None:
        decoding = [s for s in running if s.num_uncomputed_tokens == 1]
        for seq in running:
            seq.draft = None
        groups: dict[str, tuple[list[Sequence], list[int]]] = defaultdict(lambda: ([], []))
        dry: dict[str, tuple[list[Sequence], list[int]]] = defaultdict(lambda: ([], []))
        # Sequences the controller decides for: (sequence, cap, seconds per draft token, per draft)
        candidates: dict[str, list[tuple[Sequence, int, float, float]]] = defaultdict(list)
        for seq in decoding:
            method = self.method(seq)
            if method is None:
                continue
            proposer = self.proposer(method)
            cap = seq.params.num_speculative_tokens or self.num_speculative_tokens or proposer.default_draft_tokens
            limit = min(cap, self.max_model_len - seq.num_tokens - 1)
            to_come = PAYBACK_TOKENS
            if seq.params.max_tokens is not None:
                limit = min(limit, seq.params.max_tokens - seq.num_output_tokens - 1)
                to_come = min(to_come, seq.params.max_tokens - seq.num_output_tokens)
            if self.adaptive is None or limit <= 0:
                if limit > 0:
                    groups[method][0].append(seq)
                    groups[method][1].append(limit)
                continue
            per_token, per_draft = self._draft_costs(method)
            # A drafter's one-off catch-up (reading the prompt) is paid back over the tokens still to come.
            per_draft += proposer.pending_seconds(seq) / max(to_come, 1)
            candidates[method].append((seq, limit, per_token, per_draft))
        for method, asked in candidates.items():  # only filled when the controller is on
            assert self.adaptive is not None
            proposer = self.proposer(method)
            for (seq, limit, _, _), k in zip(asked, self.adaptive.draft_lengths(asked, len(decoding), method)):
                self._settle_length(method, proposer, seq, limit, k, groups, dry)
        for method, (seqs, limits) in groups.items():
            proposer = self.proposer(method)
            started = time.perf_counter()
            drafts = proposer.propose_batch(seqs, limits)
            drafted = [d for d in drafts if d is not None]
            if drafted:
                # Passes and prompt reading (a one-off per sequence, like prefill) are not per-draft overhead.
                passes_seconds = proposer.seconds_per_pass * max(len(d) for d in drafted)
                one_off = proposer.catch_up_seconds
                fixed = max(0.0, time.perf_counter() - started - passes_seconds - one_off) / len(drafted)
                _running_mean(self.propose_seconds, method, fixed)
            for seq, draft in zip(seqs, drafts):
                seq.draft = draft
                if draft is None and self.adaptive is not None:
                    self.adaptive.idle(seq, method)
        for method, (seqs, limits) in dry.items():  # only filled when the controller is on
            adaptive = self.adaptive
            assert adaptive is not None
            for seq, draft in zip(seqs, self.proposer(method).propose_batch(seqs, limits)):
                if draft is None:
                    adaptive.idle(seq, method)
                else:
                    self._dry[seq] = _DryDraft(draft)
                    adaptive.begin_dry_draft(seq, method)

    def _settle_length(self, method: str, proposer: Proposer, seq: Sequence, limit: int, k: int,
                       groups: dict[str, tuple[list[Sequence], list[int]]],
                       dry: dict[str, tuple[list[Sequence], list[int]]]) -> None:
        """File `seq` under this step's drafts (k > 0), its dry drafts, or idle."""
        assert self.adaptive is not None
        if k > 0:
            self._dry.pop(seq, None)  # a real draft supersedes the dry one
            groups[method][0].append(seq)
            groups[method][1].append(k)
        elif seq in self._dry:
            return  # a dry draft is still being scored: that is this step's evidence
        elif proposer.drafts_for_free:
            dry[method][0].append(seq)
            dry[method][1].append(limit)
        else:
            self.adaptive.idle(seq, method)

    def record_step(self, scheduled: list[ScheduledSequence], seconds: float) -> None:
        """Time of one forward pass, for the cost model: decode-only steps only (see adaptive.py)."""
        if all(item.num_tokens == 1 for item in scheduled):
            self.cost.record(sum(item.num_query_tokens for item in scheduled), seconds,
                             sum(1 for item in scheduled if item.draft is not None))

    # -- after the forward pass -----------------------------------------------------------------

    def _teach_pools(self, items: list[ScheduledSequence], logits: torch.Tensor) -> None:
        """Show the learning pools every row of the step, from every sequence, speculating or not."""
        fed_all: list[int] = []  # every row's input token and the token before it
        preceding_all: list[int | None] = []
        for item in items:
            seq, draft = item.seq, item.draft
            fed = [seq.token_ids[-1]] + (draft.token_ids if draft else [])
            fed_all += fed
            preceding_all.append(seq.token_ids[-2] if len(seq.token_ids) > 1 else None)
            preceding_all += [fed[parent] for parent in draft.parents] if draft else []
        for name in self._learning:
            self.proposers[name].observe(fed_all, logits, preceding_all)  # one call for the step's rows

    def sample(self, items: list[ScheduledSequence], logits: torch.Tensor,
               sampler: Sampler) -> list[tuple[list[int], list[TokenLogprob | None]]]:
        """Tokens to append for each item whose chunk completed; logits hold 1 + len(draft) rows per item."""
        starts, row = [], 0
        for item in items:
            starts.append(row)
            row += 1 + (len(item.draft) if item.draft else 0)
        plain = [i for i, item in enumerate(items) if item.draft is None]
        results: list[tuple[list[int], list[TokenLogprob | None]]] = [([], [])] * len(items)
        if plain:
            tokens, logprobs = sampler(logits[[starts[i] for i in plain]], [items[i].seq for i in plain])
            for i, token, logprob in zip(plain, tokens, logprobs):
                results[i] = ([token], [logprob])
                self._score_dry_draft(items[i].seq, token)
        if self._learning:
            self._teach_pools(items, logits[:row])
        for i, item in enumerate(items):
            seq, draft = item.seq, item.draft
            if draft is not None:
                rows = logits[starts[i]:starts[i] + 1 + len(draft)]
                started = time.perf_counter()
                verdict = verify(draft, rows, seq, self.eos_token_ids)
                item.accepted_path = verdict.path
                results[i] = (verdict.tokens, verdict.logprobs)
                item.host_seconds = time.perf_counter() - started
        return results

    def _score_dry_draft(self, seq: Sequence, token: int) -> None:
        """Follow a plainly decoding sequence's dry draft with the token it generated (as verify would)."""
        dry = self._dry.get(seq)
        if dry is None or self.adaptive is None:
            return
        draft = dry.draft
        child = next((c for c in draft.children[dry.node] if draft.token_ids[c - 1] == token), None)
        method = draft.proposer
        if child is None:
            self.adaptive.dry_token(seq, False, method)
            del self._dry[seq]
            return
        self.adaptive.dry_token(seq, True, method)
        dry.node = child
        if not draft.children[child]:  # a leaf: fully accepted if it is as deep as the draft goes
            if draft.depths[child - 1] < max(draft.depths):
                self.adaptive.dry_token(seq, False, method)
            del self._dry[seq]

    def settle(self, item: ScheduledSequence, num_appended: int) -> None:
        """Keep the KV of the accepted draft tokens that were appended; roll back the rest."""
        draft, seq = item.draft, item.seq
        if draft is None:
            return
        started = time.perf_counter()
        path = item.accepted_path[:max(0, num_appended - 1)]
        first_new = seq.num_cached_slots - len(draft)  # slot of draft node 1
        moved = [(first_new + node - 1, first_new + depth) for depth, node in enumerate(path)
                 if node != depth + 1]
        if moved:  # accepted tree nodes go to consecutive slots (their keys already carry the right positions)
            src = torch.tensor(self.blocks_slots(seq, [s for s, _ in moved]))
            dst = torch.tensor(self.blocks_slots(seq, [d for _, d in moved]))
            for k_cache, v_cache in self.kv_layers:
                copy_slots(k_cache, v_cache, src, dst)  # whatever the cache's storage (thrifty.kv.quant)
        self.blocks.truncate(seq, seq.num_cached_slots - (len(draft) - len(path)))
        seq.num_computed_tokens += len(path)
        self.blocks.commit(seq)  # only now may the accepted tokens' full blocks enter the prefix cache
        _running_mean(self.verify_seconds, draft.proposer, item.host_seconds + time.perf_counter() - started)
        counts = self.counts[draft.proposer]
        counts["drafts"] += 1
        counts["draft_tokens"] += len(draft)
        counts["accepted_tokens"] += len(item.accepted_path)
        if self.adaptive is not None:
            self.adaptive.update(seq, len(item.accepted_path), max(draft.depths), draft.proposer)

    def blocks_slots(self, seq: Sequence, positions: list[int]) -> list[int]:
        bs = self.blocks.block_size
        return [seq.block_table[p // bs] * bs + p % bs for p in positions]

    def stats(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, c in sorted(self.counts.items()):
            out[f"spec_{name}_drafts"] = c["drafts"]
            out[f"spec_{name}_draft_tokens"] = c["draft_tokens"]
            out[f"spec_{name}_accepted_tokens"] = c["accepted_tokens"]
            out[f"spec_{name}_acceptance_rate"] = c["accepted_tokens"] / max(c["draft_tokens"], 1)
            out[f"spec_{name}_mean_accepted_length"] = c["accepted_tokens"] / max(c["drafts"], 1)
        return out


def _running_mean(means: dict[str, float], key: str, value: float, weight: float = 0.1) -> None:
    means[key] = value if key not in means else (1 - weight) * means[key] + weight * value

"""Speculative decoding inside continuous batching: the engine's only entry into thrifty/spec.

Per step: `propose` gives each decoding sequence a draft (or none) before scheduling;
the scheduler reserves KV slots for it and the model runner feeds it in with the real
token, returning logits for every draft node; `sample` verifies drafts (and samples
plain sequences); `settle` keeps the accepted tokens' KV and rolls back the rest.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from thrifty.engine.sampler import Sampler, TokenLogprob
from thrifty.engine.scheduler import ScheduledSequence
from thrifty.engine.sequence import Sequence
from thrifty.kv.blocks import BlockManager
from thrifty.kv.quant import copy_slots
from thrifty.spec.adaptive import AdaptiveDraftLength, StepCostModel
from thrifty.spec.draft import Draft, Proposer
from thrifty.spec.history import HistoryProposer
from thrifty.spec.ngram import NgramProposer
from thrifty.spec.verify import verify

PROPOSERS = ("ngram", "history")
OFF = "off"


def make_proposer(name: str) -> Proposer:
    return {"ngram": NgramProposer, "history": HistoryProposer}[name]()


class Speculator:
    def __init__(self, block_manager: BlockManager, kv_layers: list[tuple[torch.Tensor, torch.Tensor]],
                 eos_token_ids: list[int], max_model_len: int, default_method: str | None = None,
                 num_speculative_tokens: int = 5, adaptive: bool = True, sliding_window: int | None = None) -> None:
        self.blocks = block_manager
        self.kv_layers = kv_layers
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len
        self.default_method = default_method
        self.num_speculative_tokens = num_speculative_tokens
        self.sliding_window = sliding_window
        self.proposers = {name: make_proposer(name) for name in PROPOSERS}
        self.cost = StepCostModel()
        self.adaptive = AdaptiveDraftLength(self.cost) if adaptive else None
        self.counts: dict[str, dict[str, int]] = defaultdict(lambda: {"drafts": 0, "draft_tokens": 0,
                                                                      "accepted_tokens": 0})

    def _method(self, seq: Sequence) -> str | None:
        method = seq.params.speculative or self.default_method
        return None if method == OFF else method

    # -- before scheduling ----------------------------------------------------------------------

    def propose(self, running: list[Sequence]) -> None:
        decoding = [s for s in running if s.num_uncomputed_tokens == 1]
        for seq in running:
            seq.draft = None
        for seq in decoding:
            method = self._method(seq)
            if method is None:
                continue
            limit = min(seq.params.num_speculative_tokens or self.num_speculative_tokens,
                        self.max_model_len - seq.num_tokens - 1)
            if seq.params.max_tokens is not None:
                limit = min(limit, seq.params.max_tokens - seq.num_output_tokens - 1)
            if self.adaptive is not None and limit > 0:
                limit = self.adaptive.draft_length(seq, limit, len(decoding), len(decoding))
            draft = self.proposers[method].propose(seq, limit) if limit > 0 else None
            if draft is None:
                if self.adaptive is not None:
                    self.adaptive.idle(seq)
                continue
            if (not draft.is_chain and self.sliding_window is not None
                    and seq.num_tokens + len(draft) > self.sliding_window):
                draft = _first_branch(draft)  # tree nodes' slots exceed their positions, so windows would cut wrongly
            seq.draft = draft

    def record_step(self, num_tokens: int, seconds: float) -> None:
        self.cost.record(num_tokens, seconds)

    # -- after the forward pass -----------------------------------------------------------------

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
        for i, item in enumerate(items):
            seq, draft = item.seq, item.draft
            fed = [seq.token_ids[-1]] + (draft.token_ids if draft else [])
            rows = logits[starts[i]:starts[i] + len(fed)]
            for proposer in self.proposers.values():  # shared pools learn from every sequence, speculating or not
                proposer.observe(fed, rows)
            if draft is not None:
                verdict = verify(draft, rows, seq, self.eos_token_ids)
                item.accepted_path = verdict.path
                results[i] = (verdict.tokens, verdict.logprobs)
        return results

    def settle(self, item: ScheduledSequence, num_appended: int) -> None:
        """Keep the KV of the accepted draft tokens that were appended; roll back the rest."""
        draft, seq = item.draft, item.seq
        if draft is None:
            return
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
        counts = self.counts[draft.proposer]
        counts["drafts"] += 1
        counts["draft_tokens"] += len(draft)
        counts["accepted_tokens"] += len(item.accepted_path)
        if self.adaptive is not None:
            self.adaptive.update(seq, len(item.accepted_path), max(draft.depths))

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


def _first_branch(draft: Draft) -> Draft:
    node, tokens = 0, []
    while draft.children[node]:
        node = draft.children[node][0]
        tokens.append(draft.token_ids[node - 1])
    return Draft.chain(tokens, draft.proposer)

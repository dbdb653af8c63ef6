"""A history pool shared by all requests, in the manner of Token Recycling.

Every forward pass produces, for each token it was fed, the target's top candidates for
the token after it. The pool keeps them twice: by the token alone and by the pair
(previous token, token), the latest overwriting older ones. A draft is a tree from the
sequence's last token: at each node the pair's candidates when the pool has seen that pair
(more specific, so more often accepted), else the token's; the best few candidates at the
first levels, then single chains, breadth first under a node budget. The tree is verified in
one pass with a tree attention mask.
"""

from __future__ import annotations

import torch

from thrifty.engine.sequence import Sequence
from thrifty.spec.draft import Draft, PerSequenceProposer

PoolSnapshot = tuple[dict[int, list[int]], dict[tuple[int, int], list[int]]]


class HistoryProposer(PerSequenceProposer):
    name = "history"
    learns_from_steps = True

    def __init__(self, branching: tuple[int, ...] = (3, 2, 1, 1, 1, 1, 1, 1), width: int = 4,
                 max_pairs: int = 262_144) -> None:
        self.branching = branching  # children per node at each depth
        self.width = width  # candidates kept per token
        self.next_tokens: dict[int, list[int]] = {}  # at most one entry per vocabulary token
        # Pairs grow with every new bigram a server sees, so the least recently written go first.
        self.max_pairs = max_pairs
        self.next_after_pair: dict[tuple[int, int], list[int]] = {}

    def _candidates(self, previous: int, token: int) -> list[int]:
        found = self.next_after_pair.get((previous, token))
        return found if found is not None else self.next_tokens.get(token, [])

    def propose(self, seq: Sequence, max_tokens: int) -> Draft | None:
        tokens: list[int] = []
        parents: list[int] = []
        previous = seq.token_ids[-2] if len(seq.token_ids) > 1 else -1
        frontier = [(0, previous, seq.token_ids[-1])]  # (node, previous token, token) of the last level
        for fanout in self.branching:
            level = []
            for node, before, token in frontier:
                for candidate in self._candidates(before, token)[:fanout]:
                    if len(tokens) == max_tokens:
                        break
                    tokens.append(candidate)
                    parents.append(node)
                    level.append((len(tokens), token, candidate))
            if not level:
                break
            frontier = level
        return Draft(tokens, parents, self.name) if tokens else None

    def snapshot(self) -> PoolSnapshot:
        # Shallow copies suffice: observe replaces candidate lists, it never edits one.
        return dict(self.next_tokens), dict(self.next_after_pair)

    def restore(self, snapshot: PoolSnapshot | None = None) -> None:
        """Go back to a snapshot of the pool, or to an empty pool (benchmarks: a pool that has not
        watched the measured requests' outputs being produced)."""
        tokens, pairs = snapshot if snapshot is not None else ({}, {})
        self.next_tokens, self.next_after_pair = dict(tokens), dict(pairs)

    def observe(self, token_ids: list[int], logits: torch.Tensor, preceding: list[int | None]) -> None:
        top = torch.topk(logits, self.width, dim=-1).indices.tolist()
        for token, previous, candidates in zip(token_ids, preceding, top):
            self.next_tokens[token] = candidates
            if previous is not None:
                pairs = self.next_after_pair
                pairs.pop((previous, token), None)  # re-inserted last: dicts keep insertion order
                pairs[(previous, token)] = candidates
                if len(pairs) > self.max_pairs:
                    del pairs[next(iter(pairs))]

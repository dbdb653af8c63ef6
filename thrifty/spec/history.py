"""A history pool shared by all requests, in the manner of Token Recycling.

Every forward pass produces, for each token it was fed, the target's top candidates for
the token after it. The pool keeps them (token -> candidate next tokens, the latest
overwriting older ones) and drafts a tree from the sequence's last token: the best
few candidates at the first levels, then single chains, breadth first under a node
budget. The tree is verified in one pass with a tree attention mask.
"""

from __future__ import annotations

import torch

from thrifty.engine.sequence import Sequence
from thrifty.spec.draft import Draft, PerSequenceProposer


class HistoryProposer(PerSequenceProposer):
    name = "history"

    def __init__(self, branching: tuple[int, ...] = (3, 2, 1, 1, 1, 1, 1, 1), width: int = 4) -> None:
        self.branching = branching  # children per node at each depth
        self.width = width  # candidates kept per token
        self.next_tokens: dict[int, list[int]] = {}

    def propose(self, seq: Sequence, max_tokens: int) -> Draft | None:
        tokens: list[int] = []
        parents: list[int] = []
        frontier = [(0, seq.token_ids[-1])]  # (node, token) of the last level
        for fanout in self.branching:
            level = []
            for node, token in frontier:
                for candidate in self.next_tokens.get(token, [])[:fanout]:
                    if len(tokens) == max_tokens:
                        break
                    tokens.append(candidate)
                    parents.append(node)
                    level.append((len(tokens), candidate))
            if not level:
                break
            frontier = level
        return Draft(tokens, parents, self.name) if tokens else None

    def observe(self, token_ids: list[int], logits: torch.Tensor) -> None:
        top = torch.topk(logits, self.width, dim=-1).indices.tolist()
        for token, candidates in zip(token_ids, top):
            self.next_tokens[token] = candidates

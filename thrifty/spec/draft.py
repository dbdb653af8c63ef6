"""A speculative draft (a token tree) and the interface every proposer implements."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from thrifty.engine.sequence import Sequence


@dataclass
class Draft:
    """Proposed tokens after a sequence's last token, as a tree.

    Node 0 is the sequence's last real token (the root); draft node i (1-based) holds
    `token_ids[i - 1]` and hangs under node `parents[i - 1]`, which is always < i, so a
    chain is parents [0, 1, 2, ...]. Siblings carry distinct tokens.
    """

    token_ids: list[int]
    parents: list[int]
    proposer: str
    depths: list[int] = field(init=False)  # of each draft node, root = 0
    children: list[list[int]] = field(init=False)  # node -> child nodes, in proposal order

    def __post_init__(self) -> None:
        if len(self.token_ids) != len(self.parents) or not self.token_ids:
            raise ValueError("a draft needs one parent per token and at least one token")
        self.children = [[] for _ in range(len(self.token_ids) + 1)]
        self.depths = []
        for node, parent in enumerate(self.parents, start=1):
            if not 0 <= parent < node:
                raise ValueError(f"draft node {node} has parent {parent}; parents must come first")
            self.children[parent].append(node)
            self.depths.append(1 + (self.depths[parent - 1] if parent else 0))

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def is_chain(self) -> bool:
        return all(parent == node for node, parent in enumerate(self.parents))

    @classmethod
    def chain(cls, token_ids: list[int], proposer: str) -> Draft:
        return cls(list(token_ids), list(range(len(token_ids))), proposer)

    def tree_mask(self) -> torch.Tensor | None:
        """[1 + len, 1 + len] bool: each node sees itself and its ancestors; None for a chain (causal)."""
        if self.is_chain:
            return None
        size = len(self) + 1
        mask = torch.zeros(size, size, dtype=torch.bool)
        mask[:, 0] = True
        mask[0, 0] = True
        for node, parent in enumerate(self.parents, start=1):
            mask[node] = mask[parent]
            mask[node, node] = True
        return mask

    def path_to(self, node: int) -> list[int]:
        """Draft nodes from the root's child down to `node`."""
        path = []
        while node:
            path.append(node)
            node = self.parents[node - 1]
        return path[::-1]


class Proposer(Protocol):
    """Proposes tokens for decoding sequences; must cost less than the forward passes it saves."""

    name: str
    # Measured costs for the adaptive controller: one batched draft pass (0 for lookups), and the
    # one-off work of the last call that is not per draft (a model drafter reading new prompts).
    seconds_per_pass: float
    catch_up_seconds: float
    default_draft_tokens: int  # the draft cap when neither the request nor the engine sets one
    # Proposing runs no model: a sequence decoding plainly can still be shown its draft, unverified,
    # to keep its acceptance estimate current (dry drafts, thrifty.spec.speculator).
    drafts_for_free: bool
    # Learns from every step's logits (a shared pool): `observe` is worth calling on each step.
    learns_from_steps: bool

    def propose_batch(self, seqs: list[Sequence], limits: list[int]) -> list[Draft | None]:
        """For each sequence at most `limits[i]` draft nodes continuing its token_ids, or None (decode plainly)."""
        ...

    def pending_seconds(self, seq: Sequence) -> float:
        """Estimated one-off work before the proposer can draft for `seq` (a drafter reading its prompt)."""
        ...

    def observe(self, token_ids: list[int], logits: torch.Tensor, preceding: list[int | None]) -> None:
        """Learn from a step: logits [len(token_ids), vocab] of the tokens that were fed in, every
        sequence's rows of the step together (one call per step, so a pool can batch its work).

        `preceding[i]` is the token before token_ids[i] on its own path (a draft node's parent;
        None before the first token of a sequence).
        """
        ...


class PerSequenceProposer:
    """Base of proposers that look at one sequence at a time (lookups, no model)."""

    name: str
    seconds_per_pass = 0.0
    catch_up_seconds = 0.0
    default_draft_tokens = 5
    drafts_for_free = True
    learns_from_steps = False

    def propose(self, seq: Sequence, max_tokens: int) -> Draft | None:
        raise NotImplementedError

    def propose_batch(self, seqs: list[Sequence], limits: list[int]) -> list[Draft | None]:
        return [self.propose(seq, limit) if limit > 0 else None for seq, limit in zip(seqs, limits)]

    def pending_seconds(self, seq: Sequence) -> float:
        return 0.0

    def observe(self, token_ids: list[int], logits: torch.Tensor, preceding: list[int | None]) -> None:
        pass

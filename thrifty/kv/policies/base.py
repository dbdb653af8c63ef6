"""The interface every KV eviction policy implements, kvpress-style.

A policy only says how much each cached token is worth (`score`); the shared mechanism in
`thrifty.kv.compression` keeps the budget, protects the policy's recent window, picks the
top tokens per KV head, compacts and frees. Policies that score by attention also say how
to fold the attention probabilities of each step into a running statistic (`observe`);
only those sequences get an attention observer, so scores cost nothing otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ScoreInputs:
    """What a policy may look at for one layer of one sequence (N cached slots)."""

    layer: int
    num_layers: int
    keys: torch.Tensor  # [kv_heads, N, head_dim], after RoPE
    values: torch.Tensor  # [kv_heads, N, head_dim]
    stat: torch.Tensor | None  # the policy's attention statistic, last dim N (None if it needs none)
    positions: torch.Tensor  # int64 [kv_heads, N]: original token position of each slot, per head


class KVPolicy:
    """Base class: subclasses set `name` and implement `score` (and `observe` if they need attention)."""

    name: str = ""
    needs_attention: bool = False

    def window(self, budget: int) -> int:
        """How many of the newest slots are always kept (never scored away)."""
        return 0

    def observe(self, stat: torch.Tensor | None, probs: torch.Tensor) -> torch.Tensor:
        """Fold one step's attention probs [kv_heads, q, ctx] into the statistic (last dim ctx).

        `stat`, when given, already has last dim ctx (zero-padded for the new slots).
        """
        raise NotImplementedError(f"policy {self.name} does not score by attention")

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        """Worth of each cached slot, [kv_heads, N]; higher is kept."""
        raise NotImplementedError

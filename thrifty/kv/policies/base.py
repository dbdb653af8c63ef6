"""The interface every KV eviction policy implements, kvpress-style.

A policy only says how much each cached token is worth (`score`); the shared mechanism in
`thrifty.kv.compression` keeps the budget, protects the policy's recent window, picks the
top tokens per KV head, compacts and frees. Policies that score by attention also say how
to fold the attention probabilities of each step into a running statistic (`observe`);
only those sequences get an attention observer, so scores cost nothing otherwise.

Two optional hooks serve the policies that go beyond "keep the top tokens": `layer_budgets`
gives each layer its own share of the budget (PyramidKV, D2O), and `merge` folds evicted tokens
into kept ones instead of dropping them (D2O). A policy that sets `demotes` (MiKV) has its evicted
tokens kept in low precision by the shared mechanism instead of dropped.
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
    merges: bool = False  # whether `merge` is implemented
    demotes: bool = False  # evicted tokens go to a low-precision side store (with `bits`, `group_size`)

    def reset(self) -> None:
        """Forget per-sequence state: the sequence is being recomputed after preemption."""

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

    def layer_budgets(self, budget: int, num_slots: int, stats: list[torch.Tensor | None]) -> list[int] | None:
        """Slots each layer keeps, averaging `budget`, when compressing `num_slots` slots for the first
        time (fixed from then on); None keeps `budget` in every layer. `stats` are the layers' statistics."""
        return None

    def merge(self, layer: int, keys: torch.Tensor, values: torch.Tensor, kept: torch.Tensor,
              evicted: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """New keys and values [kv_heads, K, head_dim] for the kept slots `kept` [kv_heads, K], with the
        `evicted` slots [kv_heads, E] folded in; keys and values are the layer's [kv_heads, N, head_dim]."""
        raise NotImplementedError(f"policy {self.name} does not merge")

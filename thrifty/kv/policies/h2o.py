"""H2O (Zhang et al. 2023): keep the "heavy hitters", the tokens with the largest attention
accumulated over every query so far, plus a window of the most recent tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from thrifty.kv.policies.base import KVPolicy, ScoreInputs


@dataclass
class H2OPolicy(KVPolicy):
    recent_ratio: float = 0.5  # share of the budget given to the recent window (the paper splits evenly)
    name = "h2o"
    needs_attention = True

    def window(self, budget: int) -> int:
        return int(budget * self.recent_ratio)

    def observe(self, stat: torch.Tensor | None, probs: torch.Tensor) -> torch.Tensor:
        summed = probs.sum(dim=1)  # [kv_heads, ctx]: every query's vote
        return summed if stat is None else stat + summed

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        assert inputs.stat is not None
        return inputs.stat

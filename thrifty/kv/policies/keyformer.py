"""Keyformer (Adnan et al. 2024): "key tokens" are found with a Gumbel-softmax-regularised score,
softmax((logits + Gumbel noise) / tau), accumulated over queries; a recent window is always kept.

Attention logits equal log(probs) up to a per-row constant, which softmax ignores, so the score
is computed from the observed probabilities.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from thrifty.kv.policies.base import KVPolicy, ScoreInputs


@dataclass
class KeyformerPolicy(KVPolicy):
    recent_ratio: float = 0.3  # share of the budget for the recent window (paper: w = 30%)
    tau: float = 1.0  # Gumbel-softmax temperature
    seed: int = 0  # the noise is seeded so a run is reproducible
    name = "keyformer"
    needs_attention = True
    _generator: torch.Generator = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.tau <= 0:
            raise ValueError(f"keyformer tau must be > 0, got {self.tau}")
        self._generator = torch.Generator().manual_seed(self.seed)

    def window(self, budget: int) -> int:
        return int(budget * self.recent_ratio)

    def observe(self, stat: torch.Tensor | None, probs: torch.Tensor) -> torch.Tensor:
        uniform = torch.rand(probs.shape, generator=self._generator).clamp_(1e-10, 1 - 1e-10)
        gumbel = -torch.log(-torch.log(uniform)).to(probs.device)
        regularised = torch.softmax((torch.log(probs) + gumbel) / self.tau, dim=-1).sum(dim=1)
        return regularised if stat is None else stat + regularised

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        assert inputs.stat is not None
        return inputs.stat

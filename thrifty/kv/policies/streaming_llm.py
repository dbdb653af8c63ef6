"""StreamingLLM / LM-Infinite (Xiao et al. 2023): keep the first `sinks` tokens (attention sinks)
and the most recent ones; everything in between is evicted."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from thrifty.kv.policies.base import KVPolicy, ScoreInputs


@dataclass
class StreamingLLMPolicy(KVPolicy):
    sinks: int = 4
    name = "streaming_llm"

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        # Newer is worth more; the sinks (earliest positions) are worth everything.
        pos = inputs.positions.float()
        return torch.where(inputs.positions < self.sinks, torch.full_like(pos, float("inf")), pos)

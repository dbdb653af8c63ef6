"""TOVA (Oren et al. 2024, "Transformers are Multi-State RNNs"): keep the tokens the current
(last) query attends to most, averaged over all heads of the layer, so heads keep the same tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from thrifty.kv.policies.base import KVPolicy, ScoreInputs


@dataclass
class TOVAPolicy(KVPolicy):
    name = "tova"
    needs_attention = True

    def observe(self, stat: torch.Tensor | None, probs: torch.Tensor) -> torch.Tensor:
        last = probs[:, -1, :].mean(dim=0, keepdim=True)  # the newest query, mean over heads
        return last.expand(probs.shape[0], -1).contiguous()

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        assert inputs.stat is not None
        return inputs.stat

"""K-norm (Devoto et al. 2024, "A simple and effective L2 norm-based strategy"): keys with a
low L2 norm draw high attention, so keep the lowest-norm keys. Needs no attention scores."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from thrifty.kv.policies.base import KVPolicy, ScoreInputs


@dataclass
class KNormPolicy(KVPolicy):
    name = "knorm"

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        return -inputs.keys.float().norm(dim=-1)

"""MiKV (Yang et al. 2024, "No Token Left Behind: Reliable KV Cache Compression via Importance-Aware
Mixed Precision Quantization"): evicted tokens are kept in low precision instead of dropped.

The important tokens, chosen by an eviction policy's rule (H2O's accumulated attention plus a recent
window by default, as in the paper), stay in the cache at full precision, up to `kv_budget` slots;
every token that rule evicts is demoted instead: the shared mechanism (thrifty.kv.compression)
quantizes it to `bits` bits into the sequence's side store (thrifty.kv.quant.lowbit), and attention
takes one softmax over the full-precision slots and the dequantized demoted tokens. A demoted token
never comes back (its full precision is gone), and the importance statistic covers only the
full-precision slots, as the eviction policy alone would keep it.

The paper may also hold the important tokens at reduced precision (INT4/INT8 with a channel
balancer); here they are whatever the engine's cache holds (`kv_cache_dtype`, full precision by default).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from thrifty.kv.policies.base import KVPolicy, ScoreInputs


@dataclass
class MiKVPolicy(KVPolicy):
    bits: int = 2  # of the demoted tokens' codes: 2 or 4
    importance: str = "h2o"  # the eviction policy whose rule picks the full-precision tokens
    group_size: int = 32  # most demoted tokens sharing one per-channel key scale (thrifty.kv.quant.lowbit)
    name = "mikv"
    demotes = True
    _rule: KVPolicy = field(init=False, repr=False)

    def __post_init__(self) -> None:
        from thrifty.kv.policies import POLICIES  # the registry imports this module

        if self.bits not in (2, 4):
            raise ValueError(f"mikv bits must be 2 or 4, got {self.bits!r}")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1:
            raise ValueError(f"mikv group_size must be an integer >= 1, got {self.group_size!r}")
        # Per-layer budgets and merging would make layers demote different counts or alter kept tokens.
        rules = [name for name, cls in POLICIES.items()
                 if not (cls.merges or cls.demotes or cls.layer_budgets is not KVPolicy.layer_budgets)]
        if self.importance not in rules:
            raise ValueError(f"mikv importance {self.importance!r} is not supported; use one of {', '.join(rules)}")
        self._rule = POLICIES[self.importance]()
        self.needs_attention = self._rule.needs_attention

    def reset(self) -> None:
        self._rule.reset()

    def window(self, budget: int) -> int:
        return self._rule.window(budget)

    def observe(self, stat: torch.Tensor | None, probs: torch.Tensor) -> torch.Tensor:
        return self._rule.observe(stat, probs)

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        return self._rule.score(inputs)

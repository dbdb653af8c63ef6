"""How many tokens a sequence should draft: from its recent acceptance and the measured step cost.

Step time is modelled as a + b*T for T tokens in the batch, fitted online from the
engine's own timings. With per-token acceptance alpha, drafting k tokens yields
E(k) = (1 - alpha^(k+1)) / (1 - alpha) tokens this step for this sequence but makes the
whole step slower for all B decoding sequences, and drafting itself costs c per draft
token (a draft model's forward pass; zero for lookups) plus a fixed d of host work
(proposing, verifying, rolling back); batch throughput rises exactly when
E(k) - 1 > (B*b*k + c*k + d) / (a + b*T). The controller picks the k with the largest margin, and
k = 0 (plain decoding) when no k pays: that is the fallback. Each proposer also keeps a
slower running acceptance over all its sequences: a new sequence starts from it, and a
sequence that stopped drafting drifts back towards it (not towards an optimistic fixed
prior), so probing again is only as frequent as the proposer's record warrants.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

from thrifty.engine.sequence import Sequence


class StepCostModel:
    """Exponentially weighted least squares of step seconds against batched tokens."""

    def __init__(self, prior_ratio: float = 0.1, decay: float = 0.98, prior_weight: float = 4.0) -> None:
        self.prior_ratio = prior_ratio  # b / a before anything is measured
        self.decay = decay
        self.prior_weight = prior_weight
        self._sums: list[float] | None = None  # weight, x, y, xx, xy

    def record(self, num_tokens: int, seconds: float) -> None:
        if self._sums is None:
            # Seed with two pseudo-points on the prior line through this first measurement.
            a = seconds / (1 + self.prior_ratio * num_tokens)
            self._sums = [0.0] * 5
            for x in (1.0, 16.0):
                self._add(x, a * (1 + self.prior_ratio * x), self.prior_weight)
        self._sums = [s * self.decay for s in self._sums]
        self._add(float(num_tokens), seconds, 1.0)

    def _add(self, x: float, y: float, w: float) -> None:
        assert self._sums is not None
        for i, v in enumerate((w, w * x, w * y, w * x * x, w * x * y)):
            self._sums[i] += v

    def coefficients(self) -> tuple[float, float]:
        """(a, b) with a > 0 and b >= a / 1000; relative units before any measurement."""
        if self._sums is None:
            return 1.0, self.prior_ratio
        w, x, y, xx, xy = self._sums
        var = xx - x * x / w
        b = (xy - x * y / w) / var if var > 1e-9 else 0.0
        a = (y - b * x) / w
        if a <= 0:
            a = y / w * 0.5
        return a, max(b, a / 1000)


@dataclass
class _SeqState:
    accepted: float
    rejected: float


class AdaptiveDraftLength:
    def __init__(self, cost: StepCostModel, prior_acceptance: float = 0.6, memory: float = 0.8,
                 relax: float = 0.05, proposer_memory: float = 0.97) -> None:
        self.cost = cost
        self.prior = prior_acceptance
        self.memory = memory  # weight of the past in a sequence's acceptance estimate
        self.relax = relax  # per idle step, how far acceptance returns towards the proposer's
        self.proposer_memory = proposer_memory
        self._states: weakref.WeakKeyDictionary[Sequence, _SeqState] = weakref.WeakKeyDictionary()
        self._proposers: dict[str, _SeqState] = {}

    def proposer_acceptance(self, proposer: str) -> float:
        s = self._proposers.get(proposer)
        return self.prior if s is None else s.accepted / (s.accepted + s.rejected)

    def _state(self, seq: Sequence, proposer: str) -> _SeqState:
        state = self._states.get(seq)
        if state is None:
            start = self.proposer_acceptance(proposer)
            state = self._states[seq] = _SeqState(start * 2, (1 - start) * 2)
        return state

    def acceptance(self, seq: Sequence, proposer: str = "") -> float:
        s = self._state(seq, proposer)
        return s.accepted / (s.accepted + s.rejected)

    def draft_length(self, seq: Sequence, max_tokens: int, num_decoding: int, batch_tokens: int,
                     seconds_per_token: float = 0.0, seconds_per_draft: float = 0.0, proposer: str = "") -> int:
        """Best k in [0, max_tokens] for this sequence in a batch of `num_decoding` sequences."""
        alpha = min(self.acceptance(seq, proposer), 0.99)
        a, b = self.cost.coefficients()
        step = a + b * max(batch_tokens, 1)
        best_k, best_margin = 0, 0.0
        expected = 1.0
        for k in range(1, max_tokens + 1):
            expected += alpha ** k
            margin = (expected - 1) - (num_decoding * b * k + seconds_per_token * k + seconds_per_draft) / step
            if margin > best_margin:
                best_k, best_margin = k, margin
        return best_k

    def idle(self, seq: Sequence, proposer: str = "") -> None:
        """The sequence decoded without a draft this step: its estimate drifts towards the proposer's."""
        s = self._state(seq, proposer)
        total = s.accepted + s.rejected
        alpha = s.accepted / total
        alpha += self.relax * (self.proposer_acceptance(proposer) - alpha)
        s.accepted, s.rejected = alpha * total, (1 - alpha) * total

    def update(self, seq: Sequence, num_accepted: int, depth: int, proposer: str = "") -> None:
        """A draft of `depth` levels had its first `num_accepted` accepted (geometric likelihood)."""
        missed = 1 if num_accepted < depth else 0
        s = self._state(seq, proposer)
        s.accepted = s.accepted * self.memory + num_accepted
        s.rejected = s.rejected * self.memory + missed
        g = self._proposers.setdefault(proposer, _SeqState(self.prior * 2, (1 - self.prior) * 2))
        g.accepted = g.accepted * self.proposer_memory + num_accepted
        g.rejected = g.rejected * self.proposer_memory + missed

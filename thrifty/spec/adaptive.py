"""How many tokens a sequence should draft: from its recent acceptance and the measured step cost.

Decode step time is modelled as a + b*T + c*D for T tokens in the batch of which D sequences
carry a draft, fitted online from the engine's own timings of decode-only steps (prefill
chunks follow another cost curve and would pull the fit). c is what a drafted sequence costs
beyond its tokens: on a CPU the first extra rows can leave the matrix-vector kernels and a
drafted sequence attends on its own with a tree mask, so one draft token may cost far more
than b. Drafting k tokens yields E(k) = 1 + r1 + r1*r2 + ... + r1*...*rk tokens this step for
this sequence: r1 is its recent per-token acceptance, rj (j >= 2) the chance that the proposer's
j-th draft token is accepted once the ones before it were, counted over all its verified drafts.
Acceptance comes in runs (a draft model agrees for a whole phrase, then not), so rj grows with
j: the geometric E(k) of one per-token rate (rj = r1) expects at most 2.86 tokens accepted of 5
at a rate of 0.82 where a draft model on chat had 3.95, and switched off drafts that paid
(1.27x on chat with the controller off, 1.0x with it on). Drafting makes the whole step slower
for all B decoding sequences, and drafting itself costs s per draft token (a draft model's
forward pass, shared by the m sequences drafting with it in the same step; zero for lookups)
plus a fixed d of host work (proposing, verifying, rolling back). The step then yields
B + E(k) - 1 tokens instead of B for (b*k + c + s*k/m + d) more seconds, so batch throughput
rises exactly when E(k) - 1 > B*(b*k + c + s*k/m + d) / (a + b*T): in a batch a draft must buy
B tokens' worth of time, which is why speculation pays less as batches grow. The controller
picks the k with the largest margin, and k = 0 (plain decoding) when no k clears a small safety
margin: that is the fallback. Each proposer also keeps a slower running acceptance over all
its sequences: a new sequence starts from it, and a sequence that stopped drafting drifts back
towards its own history shrunk towards it (not towards an optimistic fixed prior). A proposer
that no sequence drafts with is still probed now and then, less often after each failed probe,
so that a record made on other requests does not keep it idle for good.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import numpy as np

from thrifty.engine.sequence import Sequence


class StepCostModel:
    """Exponentially weighted least squares of decode step seconds on (1, T, D), ridge towards a prior.

    The prior (b = prior_ratio * a, c = 0) does not decay, so b stays defined while the data
    cannot tell it from a (a batch of one that never drafts has a single T); measured steps
    outweigh it after a few observations. Plain and drafted steps are weighted separately, each
    decaying only when a newer one of its kind arrives: otherwise a spell of plain decoding
    would fade what drafted steps cost back to the prior, and the fallback would rest on a guess.
    """

    def __init__(self, prior_ratio: float = 0.1, decay: float = 0.98, prior_weight: float = 1.0) -> None:
        self.prior_ratio = prior_ratio  # b / a before anything is measured
        self.decay = decay
        self.prior_weight = prior_weight
        self._xx = {False: np.zeros((3, 3)), True: np.zeros((3, 3))}  # by whether the step had drafts
        self._xy = {False: np.zeros(3), True: np.zeros(3)}
        self._prior: np.ndarray | None = None  # (a, b, c) from the first measurement
        self._solved: tuple[float, float, float] | None = None  # until the next record: asked once per sequence

    def record(self, num_tokens: int, seconds: float, num_drafted: int = 0) -> None:
        """One decode-only step: `num_tokens` rows in the batch, `num_drafted` sequences with a draft."""
        if self._prior is None:
            a = seconds / (1 + self.prior_ratio * num_tokens)
            self._prior = np.array([a, self.prior_ratio * a, 0.0])
        x = np.array([1.0, float(num_tokens), float(num_drafted)])
        kind = num_drafted > 0
        self._xx[kind] = self._xx[kind] * self.decay + np.outer(x, x)
        self._xy[kind] = self._xy[kind] * self.decay + x * seconds
        self._solved = None

    def coefficients(self) -> tuple[float, float, float]:
        """(a, b, c) with a > 0, b >= a / 1000 and c >= 0; relative units before any measurement."""
        if self._prior is None:
            return 1.0, self.prior_ratio, 0.0
        if self._solved is None:
            self._solved = self._solve(self._prior)
        return self._solved

    def _solve(self, prior: np.ndarray) -> tuple[float, float, float]:
        # Ridge on b as strong as `prior_weight` observations one token away from the rest (b is
        # not identified while T never varies); c only gets a token ridge to keep the system
        # solvable, so it is 0 until drafted steps are measured (the first drafts are the probe).
        ridge = np.diag([0.0, self.prior_weight, 1e-6])
        xx, xy = self._xx[False] + self._xx[True], self._xy[False] + self._xy[True]
        a, b, c = np.linalg.solve(xx + ridge, xy + ridge @ prior)
        if c < 0:  # drafted steps cost less than b's prior says: fit them with c held at 0, not clipped after
            (a, b), c = np.linalg.solve(xx[:2, :2] + ridge[:2, :2], xy[:2] + ridge[:2, :2] @ prior[:2]), 0.0
        if a <= 0:
            a = float(prior[0]) * 0.5
        return float(a), float(max(b, a / 1000)), float(max(c, 0.0))


@dataclass
class _Counts:
    accepted: float  # decayed counts: the recent acceptance
    rejected: float


@dataclass
class _SeqState(_Counts):
    seen_accepted: float = 0.0  # all of this sequence's drafts, undecayed
    seen_rejected: float = 0.0


class AdaptiveDraftLength:
    def __init__(self, cost: StepCostModel, prior_acceptance: float = 0.6, memory: float = 0.8,
                 relax: float = 0.05, proposer_memory: float = 0.97, min_gain: float = 0.1,
                 probe_drafts: int = 8, reprobe_after: int = 32, max_reprobe_after: int = 1024) -> None:
        self.cost = cost
        # A proposer's first drafts in this engine are made whatever the margin says, so that its
        # acceptance is measured rather than assumed (a draft model that only pays at high
        # acceptance would otherwise never be tried); afterwards the margin decides.
        self.probe_drafts = probe_drafts
        self._proposer_drafts: dict[str, int] = {}
        # A proposer the margin keeps idle would never be measured again (its record would stay
        # whatever its last drafts were, on other requests), so after `reprobe_after` idle
        # decisions one draft is made anyway; each probe that has nothing accepted doubles the wait.
        self.reprobe_after = reprobe_after
        self.max_reprobe_after = max_reprobe_after
        self._idle_decisions: dict[str, int] = {}
        self._wait: dict[str, int] = {}  # current wait before the next probe, per proposer
        self._reprobing: set[str] = set()
        # A draft must promise this many tokens per step above its cost: the estimates are noisy
        # and a draft that only breaks even on paper loses in practice.
        self.min_gain = min_gain
        self.prior = prior_acceptance
        self.memory = memory  # weight of the past in a sequence's acceptance estimate
        self.relax = relax  # per idle step, how far acceptance returns towards the proposer's
        self.proposer_memory = proposer_memory
        self._states: weakref.WeakKeyDictionary[Sequence, _SeqState] = weakref.WeakKeyDictionary()
        self._proposers: dict[str, _Counts] = {}
        # Per proposer and draft depth j (from 1): decayed counts of drafts that reached depth j
        # (the j-1 tokens before it accepted) and of those whose j-th token was accepted too.
        self._depths: dict[str, list[_Counts]] = {}

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
        """Best k in [0, max_tokens] for one sequence drafting alone in a batch of `num_decoding`."""
        return self.draft_lengths([(seq, max_tokens, seconds_per_token, seconds_per_draft)], num_decoding,
                                  proposer, batch_tokens)[0]

    def draft_lengths(self, asked: list[tuple[Sequence, int, float, float]], num_decoding: int,
                      proposer: str = "", batch_tokens: int | None = None) -> list[int]:
        """Best k for each (sequence, max tokens, seconds per draft token, seconds per draft) asking
        `proposer` in a batch of `num_decoding` sequences (`batch_tokens` rows, default one each).

        A drafter's passes are shared by the sequences that draft in the same step, so each pays a
        share: first assuming all of them draft, then again with only those that would, until the
        count holds (it only shrinks). A due re-probe makes the first sequence draft regardless.
        """
        initial = self._proposer_drafts.get(proposer, 0) < self.probe_drafts
        idle = self._idle_decisions.get(proposer, 0)
        reprobe = not initial and idle >= self._wait.get(proposer, self.reprobe_after)
        rows = num_decoding if batch_tokens is None else batch_tokens
        sharing = len(asked)
        while True:
            lengths = [self._best_length(seq, limit, num_decoding, rows, per_token / sharing, per_draft, proposer,
                                         probing=initial or (reprobe and i == 0))
                       for i, (seq, limit, per_token, per_draft) in enumerate(asked)]
            drafting = sum(1 for k in lengths if k > 0)
            if drafting in (0, sharing):
                break
            sharing = drafting
        if reprobe:
            self._reprobing.add(proposer)
        for k in lengths:
            idle = 0 if k else idle + 1
        self._idle_decisions[proposer] = idle
        return lengths

    def _best_length(self, seq: Sequence, max_tokens: int, num_decoding: int, batch_tokens: int,
                     seconds_per_token: float, seconds_per_draft: float, proposer: str, probing: bool) -> int:
        """The k with the largest margin, none below `min_gain`; a probe drafts `max_tokens`.

        A probe is there to measure the proposer at every depth: a one-token probe (the least bad
        margin while the depths are unknown) would never show that a draft model's drafts are
        accepted in runs, and the controller went on pricing its drafts as geometric.
        """
        if probing:
            return max_tokens
        alpha = min(self.acceptance(seq, proposer), 0.99)
        a, b, c = self.cost.coefficients()
        step = a + b * max(batch_tokens, 1)
        best_k, best_margin = 0, self.min_gain
        expected, reach = 1.0, 1.0
        for k in range(1, max_tokens + 1):
            reach *= alpha if k == 1 else self._continuation(proposer, k, alpha)
            expected += reach
            extra = num_decoding * (b * k + c + seconds_per_token * k + seconds_per_draft)
            margin = (expected - 1) - extra / step
            if margin > best_margin:
                best_k, best_margin = k, margin
        return best_k

    def _continuation(self, proposer: str, depth: int, alpha: float) -> float:
        """Chance that the proposer's draft token `depth` (>= 2) is accepted given the ones before it
        were, shrunk towards the sequence's per-token acceptance by two pseudo-drafts."""
        rows = self._depths.get(proposer, [])
        row = rows[depth - 1] if depth <= len(rows) else _Counts(0.0, 0.0)
        return min((row.accepted + 2 * alpha) / (row.accepted + row.rejected + 2), 0.99)

    def idle(self, seq: Sequence, proposer: str = "") -> None:
        """The sequence decoded without a draft this step: its estimate drifts towards its own record.

        That record is the sequence's whole drafting history shrunk towards the proposer's (two
        pseudo-drafts): a sequence that drafted poorly is not made hopeful again by other
        requests' success with the same proposer (a draft model's record from code, say).
        """
        s = self._state(seq, proposer)
        total = s.accepted + s.rejected
        alpha = s.accepted / total
        target = ((s.seen_accepted + 2 * self.proposer_acceptance(proposer))
                  / (s.seen_accepted + s.seen_rejected + 2))
        alpha += self.relax * (target - alpha)
        s.accepted, s.rejected = alpha * total, (1 - alpha) * total

    def update(self, seq: Sequence, num_accepted: int, depth: int, proposer: str = "") -> None:
        """A draft of `depth` levels had its first `num_accepted` accepted (geometric likelihood)."""
        self.begin_dry_draft(seq, proposer)
        self._count(seq, proposer, num_accepted, 1 if num_accepted < depth else 0)
        self._proposer_drafts[proposer] = self._proposer_drafts.get(proposer, 0) + 1
        if proposer in self._reprobing:
            self._reprobing.discard(proposer)
            wait = self._wait.get(proposer, self.reprobe_after)
            self._wait[proposer] = self.reprobe_after if num_accepted else min(2 * wait, self.max_reprobe_after)
        rows = self._depths.setdefault(proposer, [])
        rows.extend(_Counts(0.0, 0.0) for _ in range(depth - len(rows)))
        for row in rows:
            row.accepted *= self.proposer_memory
            row.rejected *= self.proposer_memory
        for j in range(min(num_accepted + 1, depth)):  # depths 1 .. num_accepted + 1 were reached
            if j < num_accepted:
                rows[j].accepted += 1
            else:
                rows[j].rejected += 1

    def begin_dry_draft(self, seq: Sequence, proposer: str = "") -> None:
        """A draft starts being scored (a verified one at once, a dry one token by token): age the past."""
        s = self._state(seq, proposer)
        s.accepted *= self.memory
        s.rejected *= self.memory
        g = self._proposer_state(proposer)
        g.accepted *= self.proposer_memory
        g.rejected *= self.proposer_memory

    def dry_token(self, seq: Sequence, hit: bool, proposer: str = "") -> None:
        """One token of a dry draft was generated: it matched the draft (hit) or ended it (miss).

        A dry draft is what a free proposer would have drafted for a sequence that decoded plainly;
        scoring it as its tokens arrive gives the same counts as verifying it, one token at a time,
        so a sequence that stopped drafting sees a copy spell begin within a step or two.
        """
        self._count(seq, proposer, int(hit), int(not hit))

    def _proposer_state(self, proposer: str) -> _Counts:
        return self._proposers.setdefault(proposer, _Counts(self.prior * 2, (1 - self.prior) * 2))

    def _count(self, seq: Sequence, proposer: str, accepted: int, missed: int) -> None:
        s = self._state(seq, proposer)
        s.accepted += accepted
        s.rejected += missed
        s.seen_accepted += accepted
        s.seen_rejected += missed
        g = self._proposer_state(proposer)  # the proposer's record over all sequences
        g.accepted += accepted
        g.rejected += missed

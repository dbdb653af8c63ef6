"""Verify a draft against the target's logits: exact-match for greedy, rejection sampling otherwise.

Each tree node's logits are processed exactly as the sampler would process them for
that position (penalties and min_tokens see the accepted draft tokens before it; then
temperature, top-k, top-p, min-p), so the output is the target's: token-for-token for
greedy, in distribution for sampling. Proposers here are deterministic (the draft
distribution q is one-hot), so the rule of Leviathan et al. / Chen et al. reduces to:
accept child x with probability p(x); on rejection remove x from p, renormalise, and
try the next sibling (SpecInfer's multi-candidate rule); if all fail, sample from what is left.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from thrifty.engine.sampler import TokenLogprob, apply_penalties, filter_logits, suppress_early_stops
from thrifty.engine.sequence import Sequence
from thrifty.spec.draft import Draft


@dataclass
class Verdict:
    tokens: list[int]  # the accepted draft tokens, then one token chosen by the target
    logprobs: list[TokenLogprob | None]
    path: list[int]  # the accepted draft nodes, root's child first


def _processed(row: torch.Tensor, seq: Sequence, eos_token_ids: list[int]) -> torch.Tensor:
    """Greedy: the penalised logits; sampling: the final probabilities the sampler would draw from."""
    logits = row.clone()[None]
    apply_penalties(logits, [seq])
    suppress_early_stops(logits, [seq], eos_token_ids)
    p = seq.params
    if p.greedy:
        return logits[0]
    return torch.softmax(filter_logits(logits[0] / p.temperature, p.top_k, p.top_p, p.min_p), dim=-1)


def _pick(scores: torch.Tensor, candidates: list[tuple[int, int]], seq: Sequence) -> tuple[int, int | None]:
    """Choose the next token given the target's scores and the (node, token) children; returns (token, node)."""
    if seq.params.greedy:
        best = int(torch.argmax(scores))
        return best, next((node for node, token in candidates if token == best), None)
    probs = scores
    for node, token in candidates:
        mass = float(probs[token])
        if mass > 0 and float(torch.rand(1, generator=seq.generator)) * float(probs.sum()) < mass:
            return token, node
        probs = probs.clone()
        probs[token] = 0.0  # the residual max(0, p - q) for a one-hot q
    return int(torch.multinomial(probs, 1, generator=seq.generator)), None


def verify(draft: Draft, logits: torch.Tensor, seq: Sequence, eos_token_ids: list[int]) -> Verdict:
    """logits: float32 [1 + len(draft), vocab], row i for tree node i (row 0: the last real token)."""
    want_logprobs = seq.params.logprobs
    verdict = Verdict([], [], [])
    base = len(seq.token_ids)
    node = 0
    try:
        while True:
            scores = _processed(logits[node], seq, eos_token_ids)
            candidates = [(child, draft.token_ids[child - 1]) for child in draft.children[node]]
            token, child = _pick(scores, candidates, seq)
            verdict.tokens.append(token)
            verdict.logprobs.append(_logprob(logits[node], token, want_logprobs))
            if child is None:
                return verdict
            verdict.path.append(child)
            seq.token_ids.append(token)  # later positions' penalties see the accepted tokens
            node = child
    finally:
        del seq.token_ids[base:]


def _logprob(row: torch.Tensor, token: int, top_n: int | None) -> TokenLogprob | None:
    if top_n is None:
        return None
    logprobs = torch.log_softmax(row, dim=-1)
    top = torch.topk(logprobs, top_n) if top_n else None
    return TokenLogprob(token, float(logprobs[token]),
                        list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else [])

"""Turn logits into next tokens according to each sequence's SamplingParams."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

from thrifty.engine.sequence import Sequence


@dataclass
class TokenLogprob:
    """Log-probability of a sampled token under the model, and the top alternatives."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob), most likely first


def apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> None:
    """Repetition (prompt and output, as in the CTRL paper / HF) and OpenAI presence/frequency penalties, in place."""
    for row, seq in enumerate(seqs):
        p = seq.params
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(seq.token_ids)), dtype=torch.long)
            values = logits[row, seen]
            logits[row, seen] = torch.where(values > 0, values / p.repetition_penalty,
                                            values * p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and seq.num_output_tokens:
            counts = Counter(seq.output_token_ids)
            ids = torch.tensor(list(counts), dtype=torch.long)
            freq = torch.tensor(list(counts.values()), dtype=logits.dtype)
            logits[row, ids] -= p.frequency_penalty * freq + p.presence_penalty


def suppress_early_stops(logits: torch.Tensor, seqs: list[Sequence], eos_token_ids: list[int]) -> None:
    """Forbid the stop tokens until a sequence has its min_tokens, in place."""
    for row, seq in enumerate(seqs):
        p = seq.params
        if seq.num_output_tokens < p.min_tokens:
            banned = list(p.stop_token_ids) + ([] if p.ignore_eos else list(eos_token_ids))
            if banned:
                logits[row, banned] = float("-inf")


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """Mask (to -inf) what top-k, top-p and min-p exclude, for one row of temperature-scaled logits."""
    vocab = logits.shape[-1]
    if 0 < top_k < vocab:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p.
        drop_sorted = (cumulative - torch.softmax(sorted_logits, dim=-1)) >= top_p
        drop_sorted[0] = False
        logits = logits.masked_fill(drop_sorted.scatter(0, order, drop_sorted), float("-inf"))
    if min_p > 0.0:
        probs = torch.softmax(logits, dim=-1)
        logits = logits.masked_fill(probs < min_p * probs.max(), float("-inf"))
    return logits


class Sampler:
    def __init__(self, eos_token_ids: list[int]) -> None:
        self.eos_token_ids = eos_token_ids

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], list[TokenLogprob | None]]:
        """logits: float32 [len(seqs), vocab], raw model output for each sequence's next token."""
        raw_logprobs = None
        if any(s.params.logprobs is not None for s in seqs):
            raw_logprobs = torch.log_softmax(logits, dim=-1)
        logits = logits.clone()
        apply_penalties(logits, seqs)
        suppress_early_stops(logits, seqs, self.eos_token_ids)

        tokens = torch.argmax(logits, dim=-1).tolist()
        for row, seq in enumerate(seqs):
            p = seq.params
            if p.greedy:
                continue
            row_logits = filter_logits(logits[row] / p.temperature, p.top_k, p.top_p, p.min_p)
            probs = torch.softmax(row_logits, dim=-1)
            tokens[row] = int(torch.multinomial(probs, 1, generator=seq.generator))

        logprobs: list[TokenLogprob | None] = [None] * len(seqs)
        if raw_logprobs is not None:
            for row, seq in enumerate(seqs):
                if seq.params.logprobs is None:
                    continue
                top = torch.topk(raw_logprobs[row], seq.params.logprobs) if seq.params.logprobs else None
                logprobs[row] = TokenLogprob(
                    token_id=tokens[row],
                    logprob=float(raw_logprobs[row, tokens[row]]),
                    top=list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else [],
                )
        return tokens, logprobs

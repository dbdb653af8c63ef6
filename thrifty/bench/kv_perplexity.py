"""Perplexity with decode-time KV compression: a text fed through the engine one decode step per token.

The first `prompt_tokens` tokens of a Paul Graham essay are the prompt; every later token comes
from a decode step whose sampled token is replaced by the text's true next token (a sampler that
forces it and records the log-probability of its row), so the cache grows one token per step and
a policy with a token budget evicts during decode exactly as it would while generating. All runs
(full cache, each policy at each budget) are sequences of one batch, so they share every step.
No public API is added: the benchmark drives `LLMEngine.step()` and swaps the engine's sampler.
"""

from __future__ import annotations

import math
import time

import torch

from thrifty.engine.sampling_params import SamplingParams


class ForcedSampler:
    """Returns the text's next token for every sequence and records its log-probability under the model."""

    def __init__(self, text_ids: list[int]) -> None:
        self.text_ids = text_ids
        self.logprobs: dict[str, list[float]] = {}

    def __call__(self, logits: torch.Tensor, seqs: list) -> tuple[list[int], list[None]]:
        logp = torch.log_softmax(logits.float(), dim=-1)
        tokens = []
        for row, seq in enumerate(seqs):
            target = self.text_ids[seq.num_tokens]  # the token that follows what the sequence holds
            self.logprobs.setdefault(seq.request_id, []).append(float(logp[row, target]))
            tokens.append(target)
        return tokens, [None] * len(seqs)


def essay_ids(tokenizer, num_tokens: int) -> list[int]:
    from thrifty.bench.kv import essays

    return tokenizer.encode(essays(), add_special_tokens=False)[:num_tokens]


def decode_perplexity(engine, text_ids: list[int], runs: list[tuple[str, int | None]], prompt_tokens: int = 64,
                      score_from: int = 0) -> dict[tuple[str, int | None], float]:
    """Perplexity of text_ids[prompt_tokens:] (scored from position `score_from` on) per (policy, budget)."""
    sampler, saved = ForcedSampler(text_ids), engine.sampler
    engine.sampler = sampler
    try:
        names = {}
        for i, (policy, budget) in enumerate(runs):
            kv = {} if policy == "full" else {"kv_policy": policy, "kv_budget": budget}
            params = SamplingParams(temperature=0, max_tokens=len(text_ids) - prompt_tokens, ignore_eos=True, **kv)
            names[f"ppl{i}"] = (policy, budget)
            engine.add_request(f"ppl{i}", text_ids[:prompt_tokens], params)
        while engine.has_unfinished_requests():
            engine.step()
    finally:
        engine.sampler = saved
    result = {}
    for request_id, key in names.items():
        # logprobs[j] is the log-probability of text_ids[prompt_tokens + j]
        scored = sampler.logprobs[request_id][max(0, score_from - prompt_tokens):]
        result[key] = math.exp(-sum(scored) / len(scored))
    return result


def perplexity_table(args) -> dict:
    from thrifty.api import LLM
    from thrifty.bench.kv import POLICIES

    policies = getattr(args, "policies", POLICIES)
    budgets = args.ppl_budgets
    llm = LLM(args.model, kv_cache_tokens=(len(policies) * len(budgets) + 1) * (args.ppl_tokens + 64) + 1024,
              enable_prefix_caching=False, num_threads=args.threads, max_num_seqs=64)
    text = essay_ids(llm.tokenizer, args.ppl_tokens)
    runs = [("full", None)] + [(p, b) for p in policies for b in budgets]
    started = time.time()
    ppl = decode_perplexity(llm.engine, text, runs, prompt_tokens=args.ppl_prompt_tokens)
    print(f"## Perplexity with decode-time compression\n\nThe first {args.ppl_tokens} tokens of the essays: "
          f"{args.ppl_prompt_tokens}-token prompt, then one decode step per token with the true token forced; "
          f"budgets in tokens ({len(runs)} sequences in one batch, {time.time() - started:.0f} s).\n")
    print("| policy | " + " | ".join(f"budget {b}" for b in budgets) + " |")
    print("|---|" + "---|" * len(budgets))
    print(f"| full cache | {ppl[('full', None)]:.2f} |" + " |" * (len(budgets) - 1))
    for p in policies:
        print(f"| {p} | " + " | ".join(f"{ppl[(p, b)]:.2f}" for b in budgets) + " |")
    print()
    return {f"{p}@{b}": v for (p, b), v in ppl.items()}

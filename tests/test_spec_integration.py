"""On the real models, greedy output with speculation equals plain decoding, token for token, in batches."""

import pytest

from thrifty.api import LLM
from thrifty.engine.sampling_params import SamplingParams

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TEXT = ("The council met on tuesday to discuss the budget. Residents has complained that the roads in the "
        "north district are in poor condition, and the council agreed to spend more money on repairs.")
PROMPTS = [
    f"Correct the mistakes in this text and repeat it:\n{TEXT}\nCorrected:",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the sea,",
    "import numpy as np\n\n# compute the mean of an array\n",
    "List three primary colors:\n1.",
    f"{TEXT}\nIn one sentence, the text says that",
]


@pytest.mark.parametrize("model_name", ["smollm2-135m", "gemma3-270m"])
def test_greedy_speculation_matches_plain_decoding(model_name):
    llm = LLM(model_name, kv_cache_tokens=8192, speculative_adaptive=False)
    prompt_ids = [llm.tokenizer.encode(p) for p in PROMPTS]
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    plain = [o.outputs[0].token_ids for o in llm.generate(prompt_ids, SamplingParams(
        temperature=0, max_tokens=48, ignore_eos=True, speculative="off"))]
    for proposer in ("ngram", "history", "draft", "layerskip"):
        mixed = [SamplingParams(temperature=0, max_tokens=48, ignore_eos=True,
                                speculative=proposer if i % 3 else "off") for i in range(len(PROMPTS))]
        # Model drafters cost real forward passes: their mixed batch alone covers both paths.
        for batch_params in (params, mixed) if proposer in ("ngram", "history") else (mixed,):
            llm.engine.speculator.default_method = proposer
            ours = [o.outputs[0].token_ids for o in llm.generate(prompt_ids, batch_params)]
            assert ours == plain, proposer
        stats = llm.engine.stats()
        assert stats[f"spec_{proposer}_drafts"] > 0
        if proposer != "layerskip":  # half the layers of these small models rarely guess right; see BENCHMARKS.md
            assert stats[f"spec_{proposer}_accepted_tokens"] > 0

"""Greedy generation on the real models equals transformers' (loading the same GGUF), token for token."""

import pytest
import torch

from thrifty.api import LLM
from thrifty.catalog import resolve_model
from thrifty.engine.sampling_params import SamplingParams

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the sea,",
    "Water boils at a temperature of",
    "List three primary colors:\n1.",
    "Translate to French: 'Good morning, how are you?'\nFrench:",
    "The quick brown fox",
    "In machine learning, overfitting means",
    "import numpy as np\n\n# compute the mean of an array\n",
    "Q: What is 12 times 12?\nA:",
]
NEW_TOKENS = 64


def transformers_greedy(path, prompt_ids: list[list[int]]) -> list[list[int]]:
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32)
    model.eval()
    results = []
    with torch.inference_mode():
        for ids in prompt_ids:
            # A plain argmax loop over transformers' KV cache: `generate` would stop at or (with
            # min_new_tokens) suppress end-of-sequence tokens, which thrifty's ignore_eos keeps.
            out = model(torch.tensor([ids]), use_cache=True)
            generated = []
            for _ in range(NEW_TOKENS):
                token = int(out.logits[0, -1].argmax())
                generated.append(token)
                out = model(torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True)
            results.append(generated)
    return results


@pytest.mark.parametrize("model_name", ["smollm2-135m", "gemma3-270m"])
def test_greedy_64_tokens_match_transformers_in_a_batch(model_name):
    path = resolve_model(model_name)
    llm = LLM(model_name, kv_cache_tokens=8192, max_num_batched_tokens=64)
    prompt_ids = [llm.tokenizer.encode(p) for p in PROMPTS]
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    # All ten prompts run together, in chunks of 64 tokens per step, so they join at different steps.
    ours = [o.outputs[0].token_ids for o in llm.generate(prompt_ids, params)]
    reference = transformers_greedy(path, prompt_ids)
    mismatches = [i for i, (a, b) in enumerate(zip(ours, reference)) if a != b]
    assert not mismatches, "\n".join(
        f"prompt {i} ({PROMPTS[i]!r}):\n thrifty      {ours[i]}\n transformers {reference[i]}" for i in mismatches)

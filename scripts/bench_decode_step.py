"""Batch-1 (or batch-B) decode step time of thrifty's decode paths, interleaved in one process.

Variants, timed in turn (A, B, C, A, B, C, ...) over the same sequences so machine load hits
them alike: `general` (the per-sequence AttentionMetadata path every step took before),
`decode` (the tensor-only DecodeMetadata path, eager) and, with --compile, `compiled` (AOTInductor).
Prints the median ms per step of each and the ratios to `general`.

    python scripts/bench_decode_step.py --weights auto --repeats 7 --steps 32 [--compile] [--realtime]

On a shared machine, --realtime times at SCHED_FIFO priority (root only), after loading and compiling
at normal priority, so other users' background jobs do not preempt the timed steps.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from thrifty.catalog import resolve_model
from thrifty.engine.compiled_decode import CompiledDecode, ModelRecipe
from thrifty.engine.engine import EngineConfig, LLMEngine
from thrifty.engine.sampling_params import SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--weights", default="auto")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--steps", type=int, default=32, help="decode steps per timed run")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per variant")
    parser.add_argument("--compile", action="store_true", help="also time the torch.compile'd step")
    parser.add_argument("--realtime", action="store_true", help="time at SCHED_FIFO priority 10 (root only)")
    args = parser.parse_args()

    variants = ["general", "decode"] + (["compiled"] if args.compile else [])
    total = args.steps * args.repeats * len(variants) + 8
    engine = LLMEngine(EngineConfig(model=args.model, weights=args.weights, num_threads=args.threads,
                                    kv_cache_tokens=args.batch * (args.prompt_len + total + 32)))
    runner, body = engine.runner, engine.model.body
    if args.compile:
        compiled = CompiledDecode(engine.model, ModelRecipe(str(resolve_model(args.model)), "float32", engine.weights))
        print(f"compile (or load from the cache): {compiled.load():.1f}s"
              + (f" (fell back to eager: {compiled.error})" if compiled.error else ""))
    params = SamplingParams(temperature=0, max_tokens=total, ignore_eos=True)
    for i in range(args.batch):
        engine.add_request(str(i), [100 + (7 * i + j) % 20000 for j in range(args.prompt_len)], params)
    for _ in range(4):  # prefill, then a few steps of every path untimed
        engine.step()

    def use(variant: str) -> None:
        runner._decode_path = variant != "general"
        runner.decode_body = compiled if variant == "compiled" else body

    for variant in variants:
        use(variant)
        engine.step()
    if args.realtime:  # every thread of the process, OpenMP's workers included
        for tid in os.listdir("/proc/self/task"):
            os.sched_setscheduler(int(tid), os.SCHED_FIFO, os.sched_param(10))
    times: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(args.repeats):
        for variant in variants:
            use(variant)
            start = time.perf_counter()
            for _ in range(args.steps):
                engine.step()
            times[variant].append((time.perf_counter() - start) / args.steps * 1e3)
    base = statistics.median(times["general"])
    print(f"{args.weights}, batch {args.batch}, {torch.get_num_threads()} threads, "
          f"{args.repeats} x {args.steps} steps each, interleaved")
    for variant in variants:
        med = statistics.median(times[variant])
        runs = " ".join(f"{t:.1f}" for t in times[variant])
        print(f"  {variant:9s} median {med:6.2f} ms/step ({1e3 / med:5.1f} tok/s per sequence)  "
              f"{base / med:.2f}x general   runs: {runs}")


if __name__ == "__main__":
    main()

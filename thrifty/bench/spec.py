"""Speculative decoding benchmark: speedup and acceptance per proposer against plain decoding, same run.

Three workloads: editing/summarising a given text, code edits, open chat (ShareGPT first
turns). Each repeat runs every prompt (or group of `--batch` prompts) plainly and then with
each proposer, on one engine; speedups are ratios of a repeat's summed wall times, and the
report gives the median over repeats. Greedy outputs are checked to be identical to plain decoding.
The history pool, shared by all requests, is reset before each of its runs: it would otherwise
draft the output it watched the plain run (and earlier repeats) produce for the same prompt. It
restarts empty, or with `--history-warmup N` from what it learned serving N other ShareGPT
prompts (never the measured ones), as a server's pool would have.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from datetime import datetime, timezone

from thrifty.engine.sampling_params import SamplingParams

TEXT = (
    "The city council met on tuesday to discuss the new budget. Many residents has complained that the "
    "roads in the north district are in poor condition, and the council agreed to spend more money on "
    "repairs next year. The mayor said that the library will stay open on weekends, although some members "
    "argued it was to expensive. A decision on the public swimming pool was postponed until the next meeting, "
    "because the engineers report was not ready. Finally, the council thanked the volunteers who cleaned "
    "the river banks during the spring festival."
)
STORY = (
    "Marie Curie was born in Warsaw in 1867. She moved to Paris in 1891 to study physics and mathematics at "
    "the Sorbonne, where she met Pierre Curie. Together they discovered the elements polonium and radium. In "
    "1903 she shared the Nobel Prize in Physics with Pierre Curie and Henri Becquerel, and in 1911 she won a "
    "second Nobel Prize, in Chemistry. She was the first person to win Nobel Prizes in two sciences. During "
    "the First World War she developed mobile X-ray units that helped surgeons treat wounded soldiers."
)
CODE = '''def load_users(path):
    users = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            name, age, email = line.split(",")
            users.append({"name": name, "age": int(age), "email": email})
    return users


def oldest(users):
    best = None
    for user in users:
        if best is None or user["age"] > best["age"]:
            best = user
    return best
'''
CODE_JS = '''function formatPrice(value, currency) {
  if (value === null || value === undefined) {
    return "";
  }
  const rounded = Math.round(value * 100) / 100;
  return currency + " " + rounded.toFixed(2);
}

function total(items) {
  let sum = 0;
  for (const item of items) {
    sum += item.price * item.quantity;
  }
  return sum;
}
'''
EDIT_PROMPTS = [
    f"Correct the grammar and spelling mistakes in this text. Reply with the corrected text only.\n\n{TEXT}",
    f"Rewrite this text, replacing 'Marie Curie' with 'she' after the first mention. Keep everything else.\n\n{STORY}",
    f"Summarise this text in a few sentences.\n\n{STORY}",
    f"Repeat the following text, but in the past tense where needed and with all mistakes fixed.\n\n{TEXT}",
]
CODE_PROMPTS = [
    f"Add type hints to this Python code and return the whole code.\n\n```python\n{CODE}```",
    f"Rename the variable `best` to `oldest_user` in this code and show the full result.\n\n```python\n{CODE}```",
    f"Add a short comment above each function in this JavaScript code and show the full code.\n\n```js\n{CODE_JS}```",
    "Write a Python function that checks whether a string is a palindrome, with a docstring and tests.",
]


def chat_prompts(count: int, seed: int, tokenizer) -> list[str]:
    from thrifty.bench.serve import load_sharegpt, sharegpt_path

    pairs = load_sharegpt(sharegpt_path())
    random.Random(seed).shuffle(pairs)
    picked = []
    for human, _ in pairs:
        if 8 <= len(tokenizer.encode(human)) <= 256:
            picked.append(human)
        if len(picked) == count:
            break
    return picked


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from thrifty.cli import add_engine_options

    add_engine_options(parser)
    parser.add_argument("--proposers", default="ngram,history,draft,layerskip",
                        help="comma-separated (default ngram,history,draft,layerskip)")
    parser.add_argument("--workloads", default="edit,code,chat")
    parser.add_argument("--num-prompts", type=int, default=4, help="prompts per workload (default 4)")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, default=1, help="requests in flight together (default 1)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--history-warmup", type=int, default=0, metavar="N",
                        help="the history pool starts each run from what it learned on N other ShareGPT "
                             "prompts (default 0: empty)")


def _run(llm, prompts: list[str], method: str, batch: int, max_tokens: int) -> tuple[float, list[list[int]]]:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, speculative=method)
    started = time.perf_counter()
    outputs = []
    for i in range(0, len(prompts), batch):
        outputs += llm.generate(prompts[i:i + batch], params)
    return time.perf_counter() - started, [o.outputs[0].token_ids for o in outputs]


def run(args: argparse.Namespace) -> None:
    from thrifty.cli import make_llm

    llm = make_llm(args, max_num_seqs=args.batch)
    workloads = {}
    for name in args.workloads.split(","):
        raw = {"edit": EDIT_PROMPTS, "code": CODE_PROMPTS}.get(name)
        if raw is None:
            raw = chat_prompts(args.num_prompts, args.seed, llm.tokenizer)
        workloads[name] = [llm.render_chat([{"role": "user", "content": p}]) for p in raw[:args.num_prompts]]
    proposers = args.proposers.split(",")
    for method in ["off"] + proposers:  # warm-up; a draft model loads on first use, outside the timings
        _run(llm, workloads[next(iter(workloads))][:1], method, 1, 8)
    for prompts in workloads.values():
        # Every prompt enters the prefix cache before the timings: otherwise the first repeat's plain
        # run reads each prompt and the proposers after it find it cached, which favours them.
        _run(llm, prompts, "off", args.batch, 1)

    history_start = None  # the pool each history run starts from
    if "history" in proposers and args.history_warmup:
        picked = chat_prompts(args.num_prompts + args.history_warmup, args.seed, llm.tokenizer)
        others = [p for p in picked[args.num_prompts:] if p not in picked[:args.num_prompts]]  # ShareGPT repeats some
        llm.engine.speculator.proposer("history").restore()
        _run(llm, [llm.render_chat([{"role": "user", "content": p}]) for p in others], "off", args.batch,
             args.max_tokens)
        history_start = llm.engine.speculator.proposer("history").snapshot()

    results = []
    for name, prompts in workloads.items():
        ratios: dict[str, list[float]] = {p: [] for p in proposers}
        times: dict[str, list[float]] = {p: [] for p in ["off"] + proposers}
        identical = {p: True for p in proposers}
        counts = {p: {"drafts": 0.0, "draft_tokens": 0.0, "accepted_tokens": 0.0} for p in proposers}
        num_tokens = 0
        for _ in range(args.repeats):
            # Each group of prompts runs plainly and then with every proposer before the next group
            # starts, so a slow spell on a shared machine hits all methods alike.
            repeat_time = dict.fromkeys(["off"] + proposers, 0.0)
            num_tokens = 0
            for start in range(0, len(prompts), args.batch):
                group = prompts[start:start + args.batch]
                plain_time, plain_ids = _run(llm, group, "off", args.batch, args.max_tokens)
                repeat_time["off"] += plain_time
                num_tokens += sum(len(t) for t in plain_ids)
                for proposer in proposers:
                    if proposer == "history":
                        # The shared pool has just watched the plain run produce this very output (and
                        # earlier repeats too), so it would draft from memory.
                        llm.engine.speculator.proposer("history").restore(history_start)
                    before = llm.engine.stats()
                    seconds, ids = _run(llm, group, proposer, args.batch, args.max_tokens)
                    after = llm.engine.stats()
                    repeat_time[proposer] += seconds
                    identical[proposer] &= ids == plain_ids
                    for key in counts[proposer]:
                        k = f"spec_{proposer}_{key}"
                        counts[proposer][key] += after.get(k, 0) - before.get(k, 0)
            times["off"].append(repeat_time["off"])
            for proposer in proposers:
                times[proposer].append(repeat_time[proposer])
                ratios[proposer].append(repeat_time["off"] / repeat_time[proposer])
        plain_rate = num_tokens / statistics.median(times["off"])
        print(f"\n{name}: {len(prompts)} prompts, {num_tokens} tokens, plain {plain_rate:.1f} tok/s", flush=True)
        for proposer in proposers:
            c = counts[proposer]
            row = {
                "workload": name, "proposer": proposer, "plain_tok_s": plain_rate,
                "spec_tok_s": num_tokens / statistics.median(times[proposer]),
                "speedup": statistics.median(ratios[proposer]), "speedups": ratios[proposer],
                "acceptance_rate": c["accepted_tokens"] / max(c["draft_tokens"], 1),
                "accepted_per_draft": c["accepted_tokens"] / max(c["drafts"], 1),
                "drafted_steps_share": c["drafts"] / max(num_tokens * args.repeats, 1),
                "identical": identical[proposer],
            }
            results.append(row)
            print(f"  {proposer:8s} {row['spec_tok_s']:6.1f} tok/s  speedup {row['speedup']:.2f}x "
                  f"(runs {', '.join(f'{r:.2f}' for r in ratios[proposer])})  acceptance {row['acceptance_rate']:.2f}"
                  f"  accepted/draft {row['accepted_per_draft']:.2f}  identical {row['identical']}", flush=True)

    print("\n| workload | proposer | plain tok/s | spec tok/s | speedup (median) | acceptance | accepted/draft | identical |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['workload']} | {r['proposer']} | {r['plain_tok_s']:.1f} | {r['spec_tok_s']:.1f} | "
              f"{r['speedup']:.2f}x | {r['acceptance_rate']:.2f} | {r['accepted_per_draft']:.2f} | "
              f"{'yes' if r['identical'] else 'NO'} |")
    print()
    for name in workloads:
        rows = [r for r in results if r["workload"] == name]
        best = max(rows, key=lambda r: r["speedup"])
        worst = min(rows, key=lambda r: r["speedup"])
        print(f"{name}: best {best['proposer']} {best['speedup']:.2f}x, lowest {worst['proposer']} "
              f"{worst['speedup']:.2f}x (adaptive {'off' if args.no_speculative_adaptive else 'on'})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"date": datetime.now(timezone.utc).isoformat(), "argv": sys.argv, "model": args.model,
                       "batch": args.batch, "results": results}, f, indent=2)

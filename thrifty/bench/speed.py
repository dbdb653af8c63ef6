"""Prefill and decode speed of thrifty beside llama.cpp and transformers on the same GGUF file.

Each system runs in its own subprocess (so its peak RSS is its own), one after the other,
with the same thread count. With `--rounds N` the systems take turns N times and the table gives
each figure's median over the rounds (a shared VM's figures move by a quarter between runs), and
the thrifty/peer ratio of each round is printed too.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from thrifty.cpu_info import cpuinfo_field

SYSTEMS = ("thrifty", "llama.cpp", "transformers")
INSTALL = {"llama.cpp": "pip install llama-cpp-python", "transformers": "pip install transformers gguf"}
# llama.cpp built for the machine it compiles on uses its AMX kernels where the CPU reports AMX; on
# some VMs those crash at their first matmul (SIGSEGV at ldtilecfg in ggml_backend_amx_mul_mat). The
# rebuild keeps every other x86 feature on, so the peer stays as fast as it can be there.
_NO_AMX_FLAGS = ("-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON "
                 "-DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON "
                 "-DGGML_AVX_VNNI=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF")
CRASH_HINT = {"llama.cpp": f"if its AMX kernels crashed, rebuild it without them: CMAKE_ARGS=\"{_NO_AMX_FLAGS}\" "
                           "pip install --force-reinstall --no-cache-dir --no-deps llama-cpp-python"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", "-m", default="smollm2-135m", help="catalog name or GGUF file")
    parser.add_argument("--weights", default="auto", help="thrifty's weight format (default auto)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="thrifty with decode steps compiled ahead of time (AOTInductor, cached)")
    parser.add_argument("--prompt-lens", default="128,512,2048", help="prefill lengths, comma-separated")
    parser.add_argument("--batch-sizes", default="1,4,8,16", help="decode batch sizes, comma-separated")
    parser.add_argument("--decode-tokens", type=int, default=64, help="tokens generated per sequence")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help="which of thrifty,llama.cpp,transformers")
    parser.add_argument("--quick", action="store_true", help="short run: prompts 128,512; batches 1,4; 16 tokens")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run the systems in turn this many times and report medians (default 1)")
    parser.add_argument("--output-dir", default="bench-speed", help="where speed.json and speed.png go")
    parser.add_argument("--worker", help=argparse.SUPPRESS)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _prompt(length: int, seed: int, vocab: int = 49152) -> list[int]:
    import random

    rng = random.Random(seed)
    return [rng.randrange(100, min(vocab, 30000)) for _ in range(length)]


def _thrifty(cfg: dict) -> dict:
    import torch  # noqa: F401  (first, alone: the RSS floor no engine can go below)

    torch_rss_mb = _peak_rss_mb()
    from thrifty.engine.engine import EngineConfig, LLMEngine
    from thrifty.engine.sampling_params import SamplingParams

    imports_rss_mb = _peak_rss_mb()

    longest = max(cfg["prompt_lens"])
    pool = max(longest + 16, max(cfg["batch_sizes"]) * (32 + cfg["decode_tokens"] + 16))
    load_start = time.perf_counter()
    # Long prompts prefill in the engine's default 512-token chunks, as llama.cpp's n_batch=512 below:
    # on a 2-core CPU that was 1.16x faster than one 2048-token chunk and peaked 160 MB lower.
    engine = LLMEngine(EngineConfig(model=cfg["model"], weights=cfg["weights"], num_threads=cfg["threads"],
                                    kv_cache_tokens=pool, max_num_seqs=max(cfg["batch_sizes"]),
                                    enable_prefix_caching=False, compile=cfg["compile"]))
    load_seconds = time.perf_counter() - load_start  # compiling included, with --compile
    loaded_rss_mb = _peak_rss_mb()
    prefill = {}
    for length in cfg["prompt_lens"]:
        best = float("inf")
        for rep in range(2):
            engine.add_request(f"p{length}-{rep}", _prompt(length, rep), SamplingParams(temperature=0, max_tokens=1))
            start = time.perf_counter()
            while engine.has_unfinished_requests():
                engine.step()
            best = min(best, time.perf_counter() - start)
        prefill[length] = length / best
    decode = {}
    n = cfg["decode_tokens"]
    for batch in cfg["batch_sizes"]:
        params = SamplingParams(temperature=0, max_tokens=n + 1, ignore_eos=True)
        for i in range(batch):
            engine.add_request(f"d{batch}-{i}", _prompt(32, 100 + i), params)
        while any(s.num_output_tokens == 0 for s in engine.scheduler.running + engine.scheduler.waiting):
            engine.step()  # prefill every sequence first; time decode steps only
        start = time.perf_counter()
        while engine.has_unfinished_requests():
            engine.step()
        decode[batch] = batch * n / (time.perf_counter() - start)
    weight_mb = sum(_module_bytes(m) for m in engine.model.modules()) / 2**20
    return {"prefill": prefill, "decode": decode, "peak_rss_mb": _peak_rss_mb(), "weights": engine.weights,
            "weights_mb": weight_mb, "kv_pool_mb": engine.kv_cache.nbytes / 2**20,
            "load_seconds": load_seconds, "rss_torch_mb": torch_rss_mb, "rss_imports_mb": imports_rss_mb,
            "rss_loaded_mb": loaded_rss_mb}


def _module_bytes(module) -> int:
    """Bytes of a module's own weights in their run format (packed or dense, plus a oneDNN-blocked copy)."""
    packed = getattr(module, "packed", None)
    blocked = getattr(module, "blocked", None)
    own = sum(p.nbytes for p in module.parameters(recurse=False))
    return own + (packed.nbytes if packed is not None else 0) + (blocked.nbytes if blocked is not None else 0)


def _llama_cpp(cfg: dict) -> dict:
    from llama_cpp import Llama

    from thrifty.catalog import resolve_model

    longest = max(cfg["prompt_lens"])
    llm = Llama(str(resolve_model(cfg["model"])), n_threads=cfg["threads"], n_threads_batch=cfg["threads"],
                n_ctx=longest + cfg["decode_tokens"] + 64, n_batch=512, verbose=False)
    prefill = {}
    for length in cfg["prompt_lens"]:
        best = float("inf")
        for rep in range(2):
            llm.reset()
            start = time.perf_counter()
            llm.eval(_prompt(length, rep))
            best = min(best, time.perf_counter() - start)
        prefill[length] = length / best
    llm.reset()
    n, produced = cfg["decode_tokens"], 0
    start = 0.0
    for _ in llm.generate(_prompt(32, 100), top_k=1, temp=0.0, reset=True):
        produced += 1
        if produced == 1:
            start = time.perf_counter()  # the first token ends the prefill
        if produced == n + 1:
            break
    # llama-cpp-python's high-level API decodes one sequence at a time: batch 1 only.
    return {"prefill": prefill, "decode": {1: n / (time.perf_counter() - start)}, "peak_rss_mb": _peak_rss_mb()}


def _transformers(cfg: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from thrifty.catalog import resolve_model

    torch.set_num_threads(cfg["threads"])
    path = Path(resolve_model(cfg["model"]))
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    prefill = {}
    with torch.inference_mode():
        for length in cfg["prompt_lens"]:
            ids = torch.tensor([_prompt(length, 0)])
            start = time.perf_counter()
            model(ids)
            prefill[length] = length / (time.perf_counter() - start)
        decode = {}
        n = cfg["decode_tokens"]
        for batch in cfg["batch_sizes"]:
            ids = torch.tensor([_prompt(32, 100 + i) for i in range(batch)])
            start = time.perf_counter()
            model.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False, pad_token_id=0)
            first = time.perf_counter() - start
            start = time.perf_counter()
            model.generate(ids, max_new_tokens=n + 1, min_new_tokens=n + 1, do_sample=False, pad_token_id=0)
            decode[batch] = batch * n / (time.perf_counter() - start - first)
    return {"prefill": prefill, "decode": decode, "peak_rss_mb": _peak_rss_mb(), "dtype": "float32"}


WORKERS = {"thrifty": _thrifty, "llama.cpp": _llama_cpp, "transformers": _transformers}
MODULES = {"llama.cpp": "llama_cpp", "transformers": "transformers"}


def _run_system(name: str, cfg: dict) -> dict:
    if name in MODULES:
        import importlib.util

        if importlib.util.find_spec(MODULES[name]) is None:
            return {"skipped": f"{name} is not installed; install it with `{INSTALL[name]}`"}
    proc = subprocess.run([sys.executable, "-m", "thrifty.bench.speed", "--worker", name, "--model", cfg["model"]],
                          input=json.dumps(cfg), capture_output=True, text=True)
    if proc.returncode < 0:  # killed by a signal: usually a crash inside the peer's native code
        hint = f"; {CRASH_HINT[name]}" if name in CRASH_HINT else ""
        return {"skipped": f"{name} crashed ({signal.Signals(-proc.returncode).name}){hint}"}
    if proc.returncode != 0:
        last = proc.stderr.strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
        return {"skipped": f"{name} failed: {last[0]}"}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("prefill", "decode"):
        result[key] = {int(k): v for k, v in result[key].items()}
    return result


def median_result(runs: list[dict]) -> dict:
    """One system's rounds as one result: the median of every number (prefill and decode speeds,
    RSS, load time) and the largest peak RSS; other fields (the weight format) from the first round."""
    merged = dict(runs[0])
    for key, value in runs[0].items():
        if isinstance(value, dict):
            merged[key] = {k: statistics.median(r[key][k] for r in runs) for k in value}
        elif isinstance(value, (int, float)):
            merged[key] = statistics.median(r[key] for r in runs)
    merged["peak_rss_mb_max"] = max(r["peak_rss_mb"] for r in runs)
    return merged


def round_ratios(ours: list[dict], theirs: list[dict], key: str, sub: int) -> list[float]:
    """thrifty/peer for one figure, round by round (each round ran both systems back to back)."""
    return [a[key][sub] / b[key][sub] for a, b in zip(ours, theirs) if sub in a[key] and sub in b[key]]


def _table(results: dict, cfg: dict) -> str:
    ours = results.get("thrifty", {})
    peers = [s for s in results if s != "thrifty" and "skipped" not in results[s]]
    header = "| metric | thrifty | " + " | ".join(f"{p} | thrifty/{p}" for p in peers) + " |"
    lines = [header, "|" + "---|" * (2 + 2 * len(peers))]

    def row(label: str, key: str, sub: int | None) -> None:
        mine = ours.get(key, {}).get(sub) if sub is not None else ours.get(key)
        cells = [label, f"{mine:.1f}" if mine else "-"]
        for p in peers:
            theirs = results[p].get(key, {}).get(sub) if sub is not None else results[p].get(key)
            cells += [f"{theirs:.1f}" if theirs else "-",
                      f"{mine / theirs:.2f}x" if mine and theirs else "-"]
        lines.append("| " + " | ".join(cells) + " |")

    for length in cfg["prompt_lens"]:
        row(f"prefill {length} tok (tok/s)", "prefill", length)
    for batch in cfg["batch_sizes"]:
        row(f"decode batch {batch} (tok/s)", "decode", batch)
    row("peak RSS (MB)", "peak_rss_mb", None)
    return "\n".join(lines)


def _plot(results: dict, cfg: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, xs, label in ((axes[0], "prefill", cfg["prompt_lens"], "prompt tokens"),
                               (axes[1], "decode", cfg["batch_sizes"], "batch size")):
        for name, res in results.items():
            if "skipped" in res:
                continue
            points = [(x, res[key][x]) for x in xs if x in res[key]]
            if points:
                ax.plot(*zip(*points), marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel(label)
        ax.set_ylabel("tokens/s")
        ax.set_title(f"{key} ({cfg['threads']} threads)")
        ax.legend()
    fig.suptitle(f"{cfg['model']}, thrifty weights={cfg['weights']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def run(args: argparse.Namespace) -> None:
    if args.quick:
        args.prompt_lens, args.batch_sizes, args.decode_tokens = "128,512", "1,4", 16
    cfg = {"model": args.model, "weights": args.weights, "threads": args.threads,
           "prompt_lens": [int(x) for x in args.prompt_lens.split(",")],
           "batch_sizes": [int(x) for x in args.batch_sizes.split(",")], "decode_tokens": args.decode_tokens,
           "compile": args.compile}
    if args.rounds < 1:
        raise SystemExit(f"--rounds must be at least 1, got {args.rounds}")
    names = args.systems.split(",")
    for name in names:
        if name not in WORKERS:
            raise SystemExit(f"unknown system {name!r}; use some of {', '.join(SYSTEMS)}")
    rounds: dict[str, list[dict]] = {name: [] for name in names}
    skipped: dict[str, dict] = {}
    for number in range(1, args.rounds + 1):
        for name in names:
            if name in skipped:
                continue
            print(f"running {name} (round {number} of {args.rounds}) ...", file=sys.stderr, flush=True)
            result = _run_system(name, cfg)
            if "skipped" in result:
                print(f"  skipped: {result['skipped']}", file=sys.stderr)
                skipped[name] = result
            else:
                rounds[name].append(result)
    results = {name: skipped[name] if name in skipped else median_result(rounds[name]) for name in names}
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    record = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": f"{platform.processor() or platform.machine()}, "
              f"{_cpu_name()}", "command": " ".join(sys.argv), "config": cfg, "results": results,
              "rounds": {name: runs for name, runs in rounds.items() if runs}}
    (out / "speed.json").write_text(json.dumps(record, indent=2))
    _plot(results, cfg, out / "speed.png")
    print(_table(results, cfg))
    if args.rounds > 1:
        print(f"\nmedians of {args.rounds} rounds; thrifty/peer in each round:")
        for peer in (n for n in names if n != "thrifty" and rounds[n] and rounds.get("thrifty")):
            for key, subs in (("prefill", cfg["prompt_lens"]), ("decode", cfg["batch_sizes"])):
                for sub in subs:
                    ratios = round_ratios(rounds["thrifty"], rounds[peer], key, sub)
                    if ratios:
                        print(f"  {key} {sub} vs {peer}: " + ", ".join(f"{r:.2f}x" for r in ratios))
    if "thrifty" in results and "skipped" not in results["thrifty"]:
        t = results["thrifty"]
        print(f"\nthrifty weights={t['weights']}: {t['weights_mb']:.0f} MB in run format, KV pool {t['kv_pool_mb']:.0f} MB, "
              f"peak RSS {t['peak_rss_mb']:.0f} MB (target <= {t['weights_mb'] + t['kv_pool_mb'] + 400:.0f} MB)"
              + (f", {t['peak_rss_mb_max']:.0f} MB in the worst round" if args.rounds > 1 else ""))
        print(f"thrifty load{' and compile' if cfg['compile'] else ''}: {t['load_seconds']:.1f}s")
        if "rss_torch_mb" in t:
            print(f"peak RSS breakdown: {t['rss_torch_mb']:.0f} MB after `import torch`, "
                  f"{t['rss_imports_mb']:.0f} MB after thrifty's imports, {t['rss_loaded_mb']:.0f} MB with the "
                  f"model and KV pool loaded; running added {t['peak_rss_mb'] - t['rss_loaded_mb']:.0f} MB "
                  f"(activations, attention scratch)")
        if 1 in t["decode"] and max(cfg["batch_sizes"]) in t["decode"]:
            top = max(cfg["batch_sizes"])
            print(f"batch {top} / batch 1 aggregate decode: {t['decode'][top] / t['decode'][1]:.2f}x")
    print(f"saved {out / 'speed.json'} and {out / 'speed.png'}")


def _cpu_name() -> str:
    return cpuinfo_field("model name") or "unknown CPU"


def _worker_main() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args()
    cfg = json.loads(sys.stdin.read())
    print(json.dumps(WORKERS[args.worker](cfg)))


if __name__ == "__main__":
    _worker_main()

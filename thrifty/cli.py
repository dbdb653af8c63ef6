"""Command line: thrifty generate | chat | serve | bench | models."""

from __future__ import annotations

import argparse
import os
import sys
import time

from thrifty.catalog import DEFAULT_MODEL
from thrifty.errors import ThriftyError


def add_engine_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model and engine")
    g.add_argument("--model", "-m", default=DEFAULT_MODEL,
                   help=f"catalog name (see `thrifty models`), GGUF file or Hugging Face directory (default {DEFAULT_MODEL})")
    g.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    g.add_argument("--weights", default="fp32", choices=["auto", "gguf", "int8", "int4", "bf16", "fp32"],
                   help="run format of matmul weights: auto picks the fastest that keeps quality on this CPU; "
                        "gguf keeps 4-bit GGUF blocks as int4; fp32 (default) is exact, and keeps a second, "
                        "oneDNN-blocked copy of each weight for prefill and verify steps")
    g.add_argument("--max-model-len", type=int, help="context window to use (default: the model's)")
    g.add_argument("--kv-cache-tokens", type=int, help="KV pool size in tokens")
    g.add_argument("--kv-cache-memory", help="KV pool size in bytes, e.g. 512MiB (instead of --kv-cache-tokens)")
    g.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "int8", "kivi4", "kivi2", "gear4", "gear2"],
                   help="KV cache storage: auto (the model's dtype), int8 (per-token scales), kivi4/kivi2 (KIVI "
                        "4/2-bit: keys per channel, values per token, partial blocks in full precision) or "
                        "gear4/gear2 (KIVI plus a rank-2 correction of the quantization error and 2%% outliers)")
    g.add_argument("--threads", type=int, help="CPU threads for PyTorch")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="compile the decode steps ahead of time (AOTInductor): built at the first start (about "
                        "a minute per graph, 3 graphs per model), then loaded from $THRIFTY_CACHE_DIR/aot; about "
                        "2x faster batch-1 steps on a 2-core CPU; eager if building fails (default off)")
    g.add_argument("--chat-template", metavar="FILE", help="Jinja2 chat template to use instead of the model's")
    g.add_argument("--kv-policy", help="KV eviction for requests that do not choose: streaming_llm, h2o, snapkv, "
                                       "tova, knorm, keyformer, pyramidkv, d2o, mikv (default none)")
    g.add_argument("--kv-budget", type=_kv_budget, help="KV slots each sequence keeps: tokens (e.g. 512) "
                                                        "or a fraction of the prompt (e.g. 0.25)")
    g.add_argument("--speculative", choices=["ngram", "history", "draft", "layerskip", "off"],
                   help="speculative decoding for requests that do not choose (default off): ngram (prompt lookup), "
                        "history (shared pool of earlier continuations), draft (a draft model), layerskip (the "
                        "target with some layers skipped)")
    g.add_argument("--speculative-draft-model", metavar="MODEL",
                   help="draft model for --speculative draft: catalog name or file with the same tokenizer "
                        "(default: the target's own file, run as --speculative-draft-weights)")
    g.add_argument("--speculative-draft-weights", default="int4",
                   choices=["auto", "gguf", "int8", "int4", "bf16", "fp32"],
                   help="run format of the draft model (default int4: a cheap copy of the target)")
    g.add_argument("--speculative-layer-fraction", type=float, default=0.5,
                   help="share of the target's layers the layerskip drafter runs (default 0.5)")
    g.add_argument("--num-speculative-tokens", type=int, default=None,
                   help="most draft tokens per step (default: 16 for ngram, whose drafts are chains copied from "
                        "the text, 5 for the others)")
    g.add_argument("--no-speculative-adaptive", action="store_true",
                   help="fixed draft length; by default it follows acceptance and turns off when it does not pay")


def _kv_budget(text: str) -> int | float:
    return float(text) if "." in text else int(text)


def add_sampling_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("sampling")
    g.add_argument("--max-tokens", "-n", type=int, default=256)
    g.add_argument("--temperature", "-t", type=float, default=0.0, help="0 is greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--presence-penalty", type=float, default=0.0)
    g.add_argument("--frequency-penalty", type=float, default=0.0)
    g.add_argument("--seed", type=int)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="thrifty", description="Inference that spends less per token.")
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="complete a prompt, streaming to the terminal")
    gen.add_argument("prompt", help="the prompt text, or - to read it from standard input")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    gen.add_argument("--system", help="system message (with --chat)")
    add_engine_options(gen)
    add_sampling_options(gen)

    chat = commands.add_parser("chat", help="interactive chat that keeps the conversation history")
    chat.add_argument("--system", help="system message")
    add_engine_options(chat)
    add_sampling_options(chat)

    commands.add_parser("models", help="list the built-in models, whether installed, and how to install them")

    serve = commands.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions)")
    add_engine_options(serve)
    add_server_options(serve)

    from thrifty.bench import kv as bench_kv, serve as bench_serve, spec as bench_spec, speed as bench_speed

    bench = commands.add_parser("bench", help="benchmarks")
    bench_kinds = bench.add_subparsers(dest="bench_kind", required=True)
    bench_serve.add_arguments(bench_kinds.add_parser("serve", help=bench_serve.__doc__.splitlines()[0]))
    bench_speed.add_arguments(bench_kinds.add_parser("speed", help=bench_speed.__doc__.splitlines()[0]))
    bench_spec.add_arguments(bench_kinds.add_parser("spec", help=bench_spec.__doc__.splitlines()[0]))
    bench_kv.add_arguments(bench_kinds.add_parser("kv", help=bench_kv.__doc__.splitlines()[0]))
    return parser


def add_server_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--api-key", default=os.environ.get("THRIFTY_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 routes (default: $THRIFTY_API_KEY, else none)")
    g.add_argument("--served-model-name", help="model name clients send and see (default: --model)")
    g.add_argument("--max-queue", type=int, default=256,
                   help="requests that may wait beyond --max-num-seqs before new ones get 429 (default 256)")
    g.add_argument("--drain-timeout", type=float, default=60.0,
                   help="seconds to let requests in flight finish after SIGTERM (default 60)")
    g.add_argument("--max-num-seqs", type=int, default=64, help="sequences decoded together (default 64)")
    g.add_argument("--max-num-batched-tokens", type=int, default=512,
                   help="tokens per engine step; longer prompts are prefilled in chunks (default 512)")
    g.add_argument("--scheduling-policy", default="fcfs", choices=["fcfs", "priority"],
                   help="priority: requests with a lower 'priority' field run first")
    g.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def make_llm(args: argparse.Namespace, **engine_options: object):
    from thrifty.api import LLM
    from thrifty.kv.cache import parse_bytes

    chat_template = None
    if args.chat_template:
        with open(args.chat_template, encoding="utf-8") as f:
            chat_template = f.read()
    started = time.perf_counter()
    llm = LLM(args.model, device=args.device, dtype=args.dtype, weights=args.weights, max_model_len=args.max_model_len,
              kv_cache_tokens=args.kv_cache_tokens,
              kv_cache_bytes=parse_bytes(args.kv_cache_memory) if args.kv_cache_memory else None,
              kv_cache_dtype=args.kv_cache_dtype,
              num_threads=args.threads, chat_template=chat_template, show_progress=sys.stderr.isatty(),
              speculative=args.speculative, num_speculative_tokens=args.num_speculative_tokens,
              speculative_adaptive=not args.no_speculative_adaptive,
              speculative_draft_model=args.speculative_draft_model,
              speculative_draft_weights=args.speculative_draft_weights,
              speculative_layer_fraction=args.speculative_layer_fraction,
              kv_policy=args.kv_policy, kv_budget=args.kv_budget, compile=args.compile, **engine_options)
    print(f"[loaded {args.model} in {time.perf_counter() - started:.1f}s]", file=sys.stderr)
    return llm


def sampling_params(args: argparse.Namespace):
    from thrifty.engine.sampling_params import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                          presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                          seed=args.seed, stop=args.stop)


def stream_completion(llm, prompt: str, params) -> str:
    """Print the completion as it is generated, then a line of timing figures on stderr."""
    from tqdm import tqdm

    started = time.perf_counter()
    first_token_at = None
    text, num_tokens, prompt_len = "", 0, 0
    bar: tqdm | None = None

    def show_prefill(done: int, total: int) -> None:
        nonlocal bar
        if bar is None and done < total and sys.stderr.isatty():
            bar = tqdm(total=total, desc="prefill", unit=" tokens", leave=False)
        if bar is not None:
            bar.update(done - bar.n)

    for output in llm.stream(prompt, params, on_prefill_progress=show_prefill):
        if first_token_at is None:
            first_token_at = time.perf_counter()
            prompt_len = len(output.prompt_token_ids)
            if bar is not None:
                bar.close()
        completion = output.outputs[0]
        sys.stdout.write(completion.delta_text)
        sys.stdout.flush()
        text, num_tokens = completion.text, len(completion.token_ids)
    print()
    prefill_time = (first_token_at or started) - started
    decode_time = time.perf_counter() - (first_token_at or started)
    rate = (num_tokens - 1) / decode_time if num_tokens > 1 and decode_time > 0 else 0.0
    print(f"[{prompt_len} prompt tokens in {prefill_time:.2f}s, {num_tokens} generated at {rate:.1f} tokens/s]",
          file=sys.stderr)
    return text


def cmd_generate(args: argparse.Namespace) -> None:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    llm = make_llm(args)
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        prompt = llm.render_chat(messages + [{"role": "user", "content": prompt}])
    stream_completion(llm, prompt, sampling_params(args))


def cmd_chat(args: argparse.Namespace) -> None:
    llm = make_llm(args)
    params = sampling_params(args)
    history = [{"role": "system", "content": args.system}] if args.system else []
    print("[chat: type a message; /reset clears the history; Ctrl-D or /exit quits]", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return
        if line.strip() in ("/exit", "/quit"):
            return
        if line.strip() == "/reset":
            history = history[:1] if args.system else []
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        try:
            reply = stream_completion(llm, llm.render_chat(history), params)
        except ThriftyError as error:
            history.pop()
            print(f"error: {error}", file=sys.stderr)
            continue
        history.append({"role": "assistant", "content": reply})


def cmd_models(_: argparse.Namespace) -> None:
    from thrifty.catalog import format_model_table

    print(format_model_table())


def cmd_serve(args: argparse.Namespace) -> None:
    from thrifty.server.launch import serve

    llm = make_llm(args, max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                   scheduling_policy=args.scheduling_policy)
    serve(llm.engine, args.served_model_name or args.model, args.host, args.port, api_key=args.api_key,
          max_queue=args.max_queue, drain_timeout=args.drain_timeout, log_level=args.log_level)


def cmd_bench(args: argparse.Namespace) -> None:
    from thrifty.bench import kv as bench_kv, serve as bench_serve, spec as bench_spec, speed as bench_speed

    {"serve": bench_serve.run, "spec": bench_spec.run, "kv": bench_kv.run,
     "speed": bench_speed.run}[args.bench_kind](args)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {"generate": cmd_generate, "chat": cmd_chat, "models": cmd_models, "serve": cmd_serve,
                "bench": cmd_bench}
    try:
        handlers[args.command](args)
    except ThriftyError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

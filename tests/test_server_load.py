"""`thrifty serve` under load: many concurrent streams, clients that vanish, blocks that must come back."""

from __future__ import annotations

import asyncio
import random
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.integration

MODEL = "smollm2-135m"
NUM_CLIENTS = 64
MAX_TOKENS = 8


def engine_metrics(base_url: str) -> dict[str, float]:
    """Unlabelled samples and the finished-request counters of /metrics, by sample name (+ label)."""
    values = {}
    for family in text_string_to_metric_families(httpx.get(f"{base_url}/metrics", timeout=10).text):
        for sample in family.samples:
            key = sample.name + "".join(f"[{v}]" for v in sample.labels.values())
            values[key] = sample.value
    return values


def wait_until_idle(base_url: str, timeout: float = 20.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        m = engine_metrics(base_url)
        idle = m["thrifty_num_requests_running"] == m["thrifty_num_requests_waiting"] == 0
        if idle and m["thrifty_kv_blocks_used"] == 0 or time.monotonic() > deadline:
            return m
        time.sleep(0.1)


async def one_client(client: openai.AsyncOpenAI, i: int, leave_after: int | None) -> str | int:
    """Stream one request; return "left" if this client disconnects early, else the tokens it received."""
    common = dict(model=MODEL, max_tokens=MAX_TOKENS, temperature=1.0, seed=i, stream=True,
                  stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    if i % 2:
        stream = await client.chat.completions.create(
            messages=[{"role": "user", "content": f"Client {i} says hello."}], logprobs=True, **common)
    else:
        stream = await client.completions.create(prompt=f"Client {i} writes a story:", logprobs=0, **common)
    tokens, seen, finish, usage = 0, 0, None, None
    async for chunk in stream:
        if leave_after is not None and seen >= leave_after:
            await stream.close()  # drops the connection mid-stream
            return "left"
        seen += 1
        usage = chunk.usage or usage
        for choice in chunk.choices:
            if choice.logprobs is not None:  # one entry per generated token, even when its text is held back
                tokens += len(choice.logprobs.content if i % 2 else choice.logprobs.tokens)
            finish = choice.finish_reason or finish
    assert finish == "length", (i, finish)
    assert usage is not None and usage.completion_tokens == tokens, (i, usage, tokens)
    return tokens


def test_concurrent_streams_with_disconnects(thrifty_server):
    base_url = thrifty_server.base_url
    before = wait_until_idle(base_url)
    rng = random.Random(0)
    leavers = set(rng.sample(range(NUM_CLIENTS), NUM_CLIENTS // 4))
    plan = {i: rng.randrange(MAX_TOKENS) if i in leavers else None for i in range(NUM_CLIENTS)}

    async def run_all() -> list[str | int]:
        limits = httpx.Limits(max_connections=NUM_CLIENTS * 2)
        async with openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="none", max_retries=0, timeout=120,
                                      http_client=httpx.AsyncClient(limits=limits, timeout=120)) as client:
            return await asyncio.wait_for(
                asyncio.gather(*(one_client(client, i, plan[i]) for i in range(NUM_CLIENTS))), timeout=150)

    started = time.monotonic()
    results = asyncio.run(run_all())  # any 5xx raises here (openai.InternalServerError)
    elapsed = time.monotonic() - started

    assert [r for i, r in enumerate(results) if i not in leavers] == [MAX_TOKENS] * (NUM_CLIENTS - len(leavers))
    assert all(results[i] == "left" for i in leavers)
    after = wait_until_idle(base_url)
    assert after["thrifty_kv_blocks_used"] == 0, "aborted requests kept their KV blocks"
    assert after["thrifty_kv_blocks_free"] == before["thrifty_kv_blocks_free"] == after["thrifty_kv_blocks_total"]
    finished = {reason: after.get(f"thrifty_requests_finished_total[{reason}]", 0)
                - before.get(f"thrifty_requests_finished_total[{reason}]", 0) for reason in ("length", "abort")}
    assert finished["length"] >= NUM_CLIENTS - len(leavers)
    assert 1 <= finished["abort"] <= len(leavers)
    print(f"{NUM_CLIENTS} streams ({len(leavers)} leaving early) in {elapsed:.1f} s; finished {finished}")


def test_non_streamed_request_is_aborted_when_the_client_leaves(thrifty_server):
    base_url = thrifty_server.base_url
    before = wait_until_idle(base_url)
    body = {"model": MODEL, "prompt": "Count to one thousand:", "max_tokens": 200, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{base_url}/v1/completions", json=body, timeout=httpx.Timeout(10, read=1.0))
    started = time.monotonic()
    after = wait_until_idle(base_url, timeout=10)
    assert after["thrifty_kv_blocks_used"] == 0
    assert time.monotonic() - started < 5, "the request ran on after its client left"
    aborts = "thrifty_requests_finished_total[abort]"
    assert after[aborts] == before.get(aborts, 0) + 1

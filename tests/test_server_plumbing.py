"""Server plumbing on a fake engine: API key, queue limit (429), drain (503, SIGTERM), engine failures."""

from __future__ import annotations

import asyncio
import json
import time

import httpx

from tests.server_fakes import FakeEngine
from tests.server_process import fake_server
from thrifty.server.app import create_app
from thrifty.server.engine_client import AsyncEngine


def run_app(engine: FakeEngine, scenario, api_key: str | None = None, max_queue: int | None = None):
    """Run `await scenario(http, client)` against the app in-process (lifespan included)."""

    async def main():
        client = AsyncEngine(engine, max_queue=max_queue)
        app = create_app(client, "fake", api_key=api_key)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30) as http:
                return await scenario(http, client)

    return asyncio.run(main())


def completion(max_tokens: int = 3, **extra) -> dict:
    return {"model": "fake", "prompt": "hi", "max_tokens": max_tokens, **extra}


def test_api_key_is_required_on_v1_routes_only():
    async def scenario(http, _):
        missing = await http.post("/v1/completions", json=completion())
        wrong = await http.post("/v1/completions", json=completion(), headers={"Authorization": "Bearer nope"})
        right = await http.post("/v1/completions", json=completion(), headers={"Authorization": "Bearer sekrit"})
        return missing, wrong, right, await http.get("/health"), await http.get("/metrics")

    missing, wrong, right, health, metrics = run_app(FakeEngine(), scenario, api_key="sekrit")
    for response in (missing, wrong):
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_api_key"
    assert right.status_code == 200 and right.json()["choices"][0]["text"] == "abc"
    assert health.status_code == metrics.status_code == 200


def test_full_queue_answers_429_with_retry_after():
    async def scenario(http, client):
        running = [asyncio.create_task(http.post("/v1/completions", json=completion(40))) for _ in range(2)]
        while client.in_flight < 2:
            await asyncio.sleep(0.01)
        refused = await http.post("/v1/completions", json=completion())
        done = await asyncio.gather(*running)
        after = await http.post("/v1/completions", json=completion())
        return refused, done, after, (await http.get("/metrics")).text

    # One sequence runs, one may wait: the third request in flight is refused.
    refused, done, after, metrics = run_app(FakeEngine(step_seconds=0.02, max_num_seqs=1), scenario, max_queue=1)
    assert refused.status_code == 429 and refused.headers["Retry-After"] == "1"
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert [r.status_code for r in done] == [200, 200] and after.status_code == 200
    assert 'thrifty_requests_rejected_total{reason="queue_full"} 1.0' in metrics


def test_draining_refuses_new_requests_and_finishes_old_ones():
    async def scenario(http, client):
        old = asyncio.create_task(http.post("/v1/completions", json=completion(20)))
        while client.in_flight < 1:
            await asyncio.sleep(0.01)
        client.begin_drain()
        new = await http.post("/v1/completions", json=completion())
        health = await http.get("/health")
        return await old, new, health, await client.wait_idle(5)

    old, new, health, idle = run_app(FakeEngine(step_seconds=0.01), scenario)
    assert old.status_code == 200 and len(old.json()["choices"][0]["text"]) == 20
    assert new.status_code == health.status_code == 503
    assert new.json()["error"]["code"] == "service_unavailable"
    assert idle


class FailingEngine(FakeEngine):
    """Fails one step (a bug inside the engine), then works again."""

    failures = 1

    def step(self):
        if self.failures and self.requests:
            self.failures -= 1
            raise RuntimeError("boom")
        return super().step()


def test_an_engine_failure_fails_the_requests_in_flight_but_not_the_server():
    async def scenario(http, _):
        failed = await http.post("/v1/completions", json=completion())
        streamed = await http.post("/v1/completions", json=completion(stream=True))
        return failed, streamed

    failed, streamed = run_app(FailingEngine(), scenario)
    assert failed.status_code == 500 and "boom" in failed.json()["error"]["message"]
    assert streamed.status_code == 200 and streamed.text.endswith("data: [DONE]\n\n")
    assert "".join(json.loads(line[6:])["choices"][0]["text"] for line in streamed.text.splitlines()
                   if line.startswith("data: {")) == "abc"


def test_sigterm_drains_in_flight_streams_then_exits(tmp_path):
    server = fake_server(step_seconds=0.05, log_path=tmp_path / "server.log")
    try:
        body = completion(30, stream=True)
        with httpx.stream("POST", f"{server.base_url}/v1/completions", json=body, timeout=30) as stream:
            lines = stream.iter_lines()
            first = next(line for line in lines if line.startswith("data:"))
            server.terminate()
            time.sleep(0.3)  # the drain starts on uvicorn's next tick
            refused = httpx.post(f"{server.base_url}/v1/completions", json=completion(), timeout=10)
            rest = [line for line in lines if line.startswith("data:")]
        text = "".join(json.loads(line[6:])["choices"][0]["text"] for line in [first, *rest[:-1]])
        assert refused.status_code == 503
        assert rest[-1] == "data: [DONE]" and len(text) == 30
        assert server.wait(timeout=20) == 0
    finally:
        server.stop()

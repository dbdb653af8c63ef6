"""kv_policy_options in the server: a JSON object of the policy's options, checked before admission (400)."""

from __future__ import annotations

import pytest

from tests.server_fakes import FakeEngine
from tests.test_server_plumbing import completion, run_app


class RecordingEngine(FakeEngine):
    def __init__(self) -> None:
        super().__init__()
        self.seen = []

    def add_request(self, request_id, prompt, params, arrival_time=None):
        self.seen.append(params)
        super().add_request(request_id, prompt, params, arrival_time)


def post(engine, body, path="/v1/completions"):
    async def scenario(http, _):
        return await http.post(path, json=body)

    return run_app(engine, scenario)


@pytest.mark.parametrize("policy, options", [
    ("snapkv", {"window_size": 16, "kernel_size": 7, "pooling": "max"}),
    ("streaming_llm", {"sinks": 0}),
    ("h2o", {"recent_ratio": 0.25}),
    ("h2o", {"recent_ratio": 1}),  # an integer where a float belongs is fine, as in JSON
    ("keyformer", {"tau": 0.5, "seed": 3}),
    ("tova", {}),
])
def test_valid_options_reach_the_engine(policy, options):
    engine = RecordingEngine()
    response = post(engine, completion(kv_policy=policy, kv_budget=0.5, kv_policy_options=options))
    assert response.status_code == 200, response.text
    assert engine.seen[0].kv_policy == policy and engine.seen[0].kv_policy_options == options


def test_chat_endpoint_takes_options_too():
    engine = RecordingEngine()
    body = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
            "kv_policy": "snapkv", "kv_budget": 64, "kv_policy_options": {"window_size": 8}}
    response = post(engine, body, "/v1/chat/completions")
    assert response.status_code == 200, response.text
    assert engine.seen[0].kv_policy_options == {"window_size": 8}


@pytest.mark.parametrize("policy, options, message", [
    ("snapkv", {"window": 16}, "does not apply to snapkv"),
    ("tova", {"sinks": 4}, "does not apply to tova"),
    ("snapkv", {"window_size": "16"}, "must be an integer"),
    ("snapkv", {"window_size": 16.0}, "must be an integer"),
    ("snapkv", {"window_size": True}, "must be an integer"),
    ("snapkv", {"window_size": 0}, "must be in [1"),
    ("snapkv", {"window_size": 10**30}, "must be in [1"),
    ("snapkv", {"kernel_size": 4}, "odd"),
    ("snapkv", {"pooling": "median"}, "pooling"),
    ("snapkv", {"pooling": 3}, "must be a string"),
    ("streaming_llm", {"sinks": -1}, "must be in [0"),
    ("h2o", {"recent_ratio": 1.5}, "must be in [0"),
    ("h2o", {"recent_ratio": None}, "must be a number"),
    ("keyformer", {"tau": 0}, "must be in (0"),
    ("keyformer", {"seed": 2**70}, "must be in"),
    ("keyformer", {"tau": [1]}, "must be a number"),
    (None, {"sinks": 4}, "need a kv_policy"),
    ("none", {"sinks": 4}, "need a kv_policy"),
    ("nonsense", {"sinks": 4}, "unknown"),
])
def test_bad_options_get_a_400_with_a_reason(policy, options, message):
    engine = RecordingEngine()
    extra = {"kv_policy_options": options}
    if policy is not None:
        extra["kv_policy"] = policy
    response = post(engine, completion(**extra))
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert message in error["message"], error["message"]
    assert not engine.seen  # nothing reached the engine


@pytest.mark.parametrize("options", [[1, 2], "window_size=16", 16])
def test_options_that_are_not_an_object_get_a_400(options):
    engine = RecordingEngine()
    response = post(engine, completion(kv_policy="snapkv", kv_policy_options=options))
    assert response.status_code == 400, response.text
    assert "kv_policy_options" in response.json()["error"]["message"]
    assert not engine.seen

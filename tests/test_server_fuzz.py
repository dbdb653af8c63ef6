"""Property-based fuzzing of request bodies: whatever a client sends, the server never answers 5xx.

Bodies mix valid values, values out of range and values of the wrong JSON type for every field
the endpoints know, plus unknown fields and bodies that are not JSON objects at all. The token
budget of each body is kept small (never absent or null: that means "until the context is
full") so that the accepted ones finish fast.
"""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

pytestmark = pytest.mark.integration

MODEL = "smollm2-135m"
FUZZ = settings(max_examples=100, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

scalars = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True, allow_infinity=True)
           | st.text(max_size=12))
junk = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                         max_size=3), max_leaves=6)


VOCAB = 49152  # SmolLM2's


def bodies(wrong: bool) -> tuple[st.SearchStrategy, st.SearchStrategy]:
    """(completion bodies, chat bodies). With `wrong`, values stray out of range and any field may be any
    JSON value; without, every value is one the API accepts, so generation paths get exercised too."""

    def f(valid: st.SearchStrategy, out_of_range: st.SearchStrategy | None = None) -> st.SearchStrategy:
        if not wrong:
            return valid
        return valid | junk if out_of_range is None else valid | out_of_range | junk

    floats = st.floats  # noqa: E731 - short alias for the table below
    common = {
        "model": f(st.just(MODEL), st.text(max_size=6)),
        "n": f(st.integers(1, 3), st.integers(-1, 0) | st.integers(129, 2**70)),
        "temperature": f(floats(0, 2), floats(-1, 0, exclude_max=True) | floats(101, 1e300)),
        "top_p": f(floats(0.01, 1), floats(-1, 0) | floats(1, 3, exclude_min=True)),
        "presence_penalty": f(floats(-2, 2), floats(2, 5, exclude_min=True)),
        "frequency_penalty": f(floats(-2, 2), floats(-5, -2, exclude_max=True)),
        "stop": f(st.text(min_size=1, max_size=4) | st.lists(st.text(min_size=1, max_size=4), max_size=3),
                  st.just("") | st.lists(st.just(""), min_size=1, max_size=1)),
        "seed": f(st.integers(0, 2**63 - 1), st.integers(-2**64, -1) | st.integers(2**63, 2**70)),
        "stream": f(st.booleans()),
        "top_k": f(st.integers(-1, VOCAB + 10), st.integers(-2**70, -2)),
        "min_p": f(floats(0, 1), floats(1, 2, exclude_min=True)),
        "repetition_penalty": f(floats(0.01, 10), floats(-1, 0) | floats(10, 1e9, exclude_min=True)),
        "min_tokens": f(st.integers(0, 1), st.integers(-3, -1) | st.integers(5, 2**40)),
        "ignore_eos": f(st.booleans()),
        "stop_token_ids": f(st.lists(st.integers(0, VOCAB - 1), max_size=3),
                            st.lists(st.integers(-3, 2**70), min_size=1, max_size=3)),
        "include_stop_str_in_output": f(st.booleans()),
        "skip_special_tokens": f(st.booleans()),
        "priority": f(st.integers(-2**70, 2**70)),
        "kv_policy": f(st.sampled_from(["none", "streaming_llm", "h2o", "snapkv", "tova", "knorm", "keyformer"]),
                       st.text(max_size=6)),
        "kv_budget": f(st.integers(1, 64) | floats(0.05, 1), st.integers(-3, 0) | floats(1, 5, exclude_min=True)),
        "speculative": f(st.sampled_from(["off", "ngram", "history"]), st.text(max_size=5)),
        "num_speculative_tokens": f(st.integers(1, 8), st.integers(-2, 0) | st.integers(65, 2**70)),
        "user": f(st.text(max_size=5)),
        "an_unknown_field": junk,
    }
    if wrong:  # only meaningful as errors: unsupported, or valid only together with other fields
        common |= {"stream_options": f(st.fixed_dictionaries({"include_usage": f(st.booleans())})),
                   "kv_policy_options": junk,
                   "logit_bias": f(st.dictionaries(st.text(max_size=3), floats(-5, 5), min_size=1, max_size=2))}
    # Never absent or null: that means "until the context window is full", too slow for a fuzz loop.
    tokens = f(st.integers(1, 4), st.integers(-2, 0) | st.sampled_from([2**31, 10**6, 2**64]))
    if wrong:
        tokens = tokens.filter(lambda v: v is not None)
    prompt = f(st.text(min_size=1, max_size=30) | st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=6)
               | st.lists(st.text(min_size=1, max_size=8), min_size=1, max_size=3),
               st.just("") | st.just([]) | st.lists(st.integers(-3, 2**70), min_size=1, max_size=3))
    completion = st.fixed_dictionaries(
        {"prompt": prompt, "max_tokens": tokens},
        optional={**common, "logprobs": f(st.integers(0, 20), st.integers(21, 2**70) | st.integers(-2**70, -1)),
                  **({"echo": f(st.booleans()), "suffix": f(st.text(max_size=3)),
                      "best_of": f(st.integers(0, 3))} if wrong else {})})
    content = st.text(max_size=20) | st.lists(st.fixed_dictionaries(
        {"type": f(st.just("text"), st.just("image_url")), "text": f(st.text(max_size=8))}), max_size=2)
    message = st.fixed_dictionaries(
        {"role": f(st.sampled_from(["system", "developer", "user", "assistant"]), st.just("wizard")),
         "content": f(content)},
        optional={"name": f(st.text(max_size=4))})
    chat = st.fixed_dictionaries(
        {"messages": f(st.lists(message, min_size=1, max_size=3), st.just([])), "max_tokens": tokens},
        optional={**common, "max_completion_tokens": tokens, "logprobs": f(st.booleans()),
                  **({"top_logprobs": f(st.integers(0, 20), st.integers(21, 99)),
                      "response_format": f(st.fixed_dictionaries({"type": st.sampled_from(["text", "json_object"])})),
                      "tools": junk, "tool_choice": junk} if wrong else {})})
    return completion, chat


completion_bodies, chat_bodies = bodies(wrong=True)
valid_completion_bodies, valid_chat_bodies = bodies(wrong=False)


@pytest.fixture(scope="module")
def http(thrifty_server):
    with httpx.Client(base_url=thrifty_server.base_url, timeout=60) as client:
        yield client


def post(http: httpx.Client, path: str, body: bytes) -> None:
    with http.stream("POST", path, content=body, headers={"content-type": "application/json"}) as response:
        text = response.read().decode()
    assert response.status_code < 500, (body, response.status_code, text)
    if response.status_code != 200:
        assert set(json.loads(text)["error"]) == {"message", "type", "param", "code"}
    elif response.headers["content-type"].startswith("text/event-stream"):
        assert text.endswith("data: [DONE]\n\n") and '"server_error"' not in text, text
    else:
        assert json.loads(text)["choices"]


@FUZZ
@given(completion_bodies | valid_completion_bodies)
def test_fuzz_completions(http, body):
    post(http, "/v1/completions", json.dumps(body).encode())


@FUZZ
@given(chat_bodies | valid_chat_bodies)
def test_fuzz_chat_completions(http, body):
    post(http, "/v1/chat/completions", json.dumps(body).encode())


@settings(FUZZ, max_examples=30)
@given(st.sampled_from(["/v1/completions", "/v1/chat/completions"]),
       st.binary(max_size=64) | junk.map(lambda v: json.dumps(v).encode()))
def test_fuzz_bodies_that_are_not_requests(http, path, body):
    post(http, path, body)


"""The OpenAI API of `thrifty serve`, driven with the official openai client against SmolLM2-135M."""

from __future__ import annotations

import httpx
import openai
import pytest

pytestmark = pytest.mark.integration

MODEL = "smollm2-135m"
PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "Name a color."}]


@pytest.fixture(scope="module")
def client(thrifty_server) -> openai.OpenAI:
    # No retries: a 5xx or 429 must show up as a failure, not be retried away.
    return openai.OpenAI(base_url=f"{thrifty_server.base_url}/v1", api_key="none", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tokenizer():
    from thrifty.catalog import resolve_model
    from thrifty.loading.tokenizer import Tokenizer

    return Tokenizer.from_gguf(resolve_model(MODEL))


@pytest.fixture(scope="module")
def http(thrifty_server) -> httpx.Client:
    with httpx.Client(base_url=thrifty_server.base_url, timeout=120) as c:
        yield c


def test_models_lists_the_served_model(client):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL


def test_completion_plain_and_streamed_agree(client, tokenizer):
    full = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0,
                                     extra_body={"ignore_eos": True})
    choice = full.choices[0]
    assert choice.finish_reason == "length" and choice.text
    assert full.usage.completion_tokens == 6
    assert full.usage.prompt_tokens == len(tokenizer.encode(PROMPT))
    assert full.usage.total_tokens == full.usage.prompt_tokens + 6

    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, stream=True,
                                            stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_token_id_prompts_and_batches(client, tokenizer):
    ids = tokenizer.encode(PROMPT)
    by_text = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0)
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=3, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    batch = client.completions.create(model=MODEL, prompt=[PROMPT, "Once upon a time"], max_tokens=2, n=2,
                                      temperature=0, extra_body={"ignore_eos": True})
    assert sorted(c.index for c in batch.choices) == [0, 1, 2, 3]
    assert batch.choices[0].text == by_text.choices[0].text[:len(batch.choices[0].text)]
    assert batch.usage.completion_tokens == 8


def test_chat_plain_and_streamed_agree(client, tokenizer):
    full = client.chat.completions.create(model=MODEL, messages=CHAT, max_completion_tokens=5, temperature=0)
    message = full.choices[0].message
    assert message.role == "assistant" and message.content
    assert full.usage.completion_tokens <= 5
    assert full.usage.prompt_tokens == len(tokenizer.encode(tokenizer.apply_chat_template(CHAT)))

    chunks = list(client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=5, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason
    usage = chunks[-1].usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (full.usage.prompt_tokens, full.usage.completion_tokens)
    assert usage.prompt_tokens_details.cached_tokens > 0  # the second time, the prompt came from the prefix cache


def test_n_choices_and_seed_reproducible(client):
    kwargs = dict(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=1.0, n=3, seed=1234,
                  extra_body={"ignore_eos": True})
    first = client.completions.create(**kwargs)
    again = client.completions.create(**kwargs)
    assert sorted(c.index for c in first.choices) == [0, 1, 2]
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    assert first.usage.completion_tokens == 12

    streamed = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=3, n=2, seed=7, stream=True,
                                              extra_body={"ignore_eos": True})
    texts = {0: "", 1: ""}
    finished = set()
    for chunk in streamed:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            if c.finish_reason:
                finished.add(c.index)
    assert finished == {0, 1} and all(texts.values())


def test_stop_sequence_cuts_the_text(client):
    base = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = base[len(base) // 2:len(base) // 2 + 2]
    cut = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0, stop=[stop, "@@@"],
                                    extra_body={"ignore_eos": True}).choices[0]
    assert cut.finish_reason == "stop"
    assert cut.text == base[:base.index(stop)]


def test_logprobs_in_openai_shapes(client):
    completion = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0, logprobs=2,
                                           extra_body={"ignore_eos": True}).choices[0]
    lp = completion.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 3
    assert "".join(lp.tokens) == completion.text
    assert all(v <= 0 for v in lp.token_logprobs) and all(len(top) >= 2 for top in lp.top_logprobs)
    # Greedy: the chosen token is the most likely one.
    assert all(lp.token_logprobs[i] == max(lp.top_logprobs[i].values()) for i in range(3))

    chat = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=3, temperature=0, logprobs=True,
                                          top_logprobs=2).choices[0]
    content = chat.logprobs.content
    assert 1 <= len(content) <= 3 and all(len(t.top_logprobs) == 2 for t in content)
    assert bytes(b for t in content for b in t.bytes).decode() == chat.message.content


def test_extra_body_sampling_options(client):
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0.7, top_p=0.9,
                                    presence_penalty=0.5, frequency_penalty=0.5, seed=3,
                                    extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1,
                                                "priority": 1, "min_tokens": 3, "some_future_field": 1})
    assert out.usage.completion_tokens == 3


def test_kv_policy_and_speculation_per_request(client):
    prompt = "The list goes: apple, pear, plum, apple, pear, plum, apple, pear, plum, apple, pear,"
    plain = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0)
    speculative = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0,
                                            extra_body={"speculative": "ngram", "num_speculative_tokens": 3})
    assert speculative.choices[0].text == plain.choices[0].text  # greedy output does not depend on drafts
    evicted = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0,
                                        extra_body={"kv_policy": "streaming_llm", "kv_budget": 16,
                                                    "ignore_eos": True})
    assert evicted.usage.completion_tokens == 4
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, extra_body={"kv_policy": "magic"})


@pytest.mark.parametrize("body, status, param", [
    (b'{"prompt": "x", "max_tokens": ', 400, None),  # malformed JSON
    (b'["not", "an", "object"]', 400, None),
    (b'{"prompt": "x", "max_tokens": "5"}', 400, "max_tokens"),  # wrong type
    (b'{"prompt": "x", "temperature": -1}', 400, None),  # out of range
    (b'{"prompt": "x", "n": 0}', 400, "n"),
    (b'{"prompt": "x", "logprobs": 99}', 400, "logprobs"),
    (b'{"prompt": ""}', 400, None),
    (b'{"prompt": [999999999]}', 400, None),  # token id outside the vocabulary
    (b'{"prompt": "x", "model": "gpt-4"}', 404, "model"),
    (b'{"prompt": "x", "stream_options": {"include_usage": true}}', 400, None),
    (b'{"prompt": "x", "min_tokens": 2, "stop_token_ids": [99999999]}', 400, None),
])
def test_bad_completion_requests_get_openai_errors(http, body, status, param):
    response = http.post("/v1/completions", content=body, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param


def test_prompt_over_the_context_window_is_a_400(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=MODEL, prompt="word " * 400, max_tokens=4)
    assert caught.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=10_000)


def test_bad_chat_requests(client, http):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=CHAT, max_tokens=2)
    for body in [{"messages": []}, {"messages": [{"role": "wizard", "content": "hi"}]},
                 {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
                 {"messages": CHAT, "top_logprobs": 2}, {"messages": CHAT, "tools": [{"type": "function"}]}]:
        response = http.post("/v1/chat/completions", json=body)
        assert response.status_code == 400, (body, response.text)


def test_unknown_route_and_method(http):
    assert http.get("/v1/nothing").status_code == 404
    assert http.get("/v1/completions").status_code == 405
    assert "error" in http.get("/v1/nothing").json()


def test_metrics_exposes_serving_figures(http, client):
    client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2)
    text = http.get("/metrics").text
    for name in ("thrifty_time_to_first_token_seconds_bucket", "thrifty_inter_token_latency_seconds_bucket",
                 "thrifty_num_requests_running", "thrifty_num_requests_waiting", "thrifty_kv_blocks_used",
                 "thrifty_kv_blocks_free", "thrifty_prompt_tokens_total", "thrifty_generation_tokens_total",
                 "thrifty_num_preemptions_total", "thrifty_requests_finished_total"):
        assert name in text, name

"""The engine end to end on tiny random-weight models: batching, chunking, preemption, stopping."""

import pytest

from thrifty.engine.sampling_params import SamplingParams
from thrifty.errors import InvalidRequestError, PromptTooLongError
from tests.fixtures.tiny_models import make_tiny_llm as make_llm

PROMPTS = [
    "the cat sat on the mat",
    "hello world, this is a longer prompt that needs more than one block of the cache",
    "a",
    "one two three four five six seven eight nine ten eleven twelve",
    "in the beginning",
    "what is the answer to everything? the answer is",
    "x y z",
    "thrifty engines spend less per token on every machine they run on",
]
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def alone(model_path):
    """Each prompt generated on its own: the reference for every batching test."""
    llm = make_llm(model_path)
    return [llm.generate(p, GREEDY)[0].outputs[0].token_ids for p in PROMPTS]


def test_batched_generation_equals_each_prompt_alone(model_path, alone):
    llm = make_llm(model_path)
    outputs = llm.generate(PROMPTS, GREEDY)
    assert [o.outputs[0].token_ids for o in outputs] == alone


def test_requests_joining_at_different_steps_get_the_same_tokens(model_path, alone):
    llm = make_llm(model_path, max_num_batched_tokens=16)
    engine = llm.engine
    results: dict[str, list[int]] = {}
    pending = list(enumerate(PROMPTS))
    step = 0
    while pending or engine.has_unfinished_requests():
        if pending and step % 2 == 0:  # a new request joins every other step
            i, prompt = pending.pop(0)
            engine.add_request(str(i), prompt, GREEDY)
        for out in engine.step():
            if out.finished:
                results[out.request_id] = out.outputs[0].token_ids
        step += 1
    assert [results[str(i)] for i in range(len(PROMPTS))] == alone


def test_preemption_and_tiny_chunks_do_not_change_the_output(model_path, alone):
    # A pool of 96 slots cannot hold eight sequences of ~30 tokens: sequences get preempted and recomputed.
    llm = make_llm(model_path, kv_cache_tokens=96, max_num_batched_tokens=8, enable_prefix_caching=False)
    outputs = llm.generate(PROMPTS, GREEDY)
    assert llm.engine.scheduler.num_preemptions > 0
    assert [o.outputs[0].token_ids for o in outputs] == alone
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks


def test_prefix_cache_reuses_blocks_without_changing_the_output(model_path):
    llm = make_llm(model_path)
    shared = "a long shared system prompt that fills several blocks of the cache. "
    first = llm.generate(shared + "first question", GREEDY)[0]
    second = llm.generate(shared + "second question", GREEDY)[0]
    assert second.num_cached_prompt_tokens >= 8
    fresh = make_llm(model_path, enable_prefix_caching=False).generate(shared + "second question", GREEDY)[0]
    assert second.outputs[0].token_ids == fresh.outputs[0].token_ids
    assert first.num_cached_prompt_tokens == 0


def test_same_seed_same_output_and_n_gives_distinct_samples(tiny_llama_gguf):
    llm = make_llm(tiny_llama_gguf)
    params = SamplingParams(temperature=1.0, max_tokens=10, seed=42, n=3, ignore_eos=True)
    a = llm.generate("the cat", params)[0]
    b = llm.generate(["x y z", "the cat"], params)[1]  # batched with another request this time
    assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]
    assert len(a.outputs) == 3 and len({tuple(c.token_ids) for c in a.outputs}) > 1


def test_streamed_deltas_add_up_to_the_final_text(tiny_llama_gguf):
    llm = make_llm(tiny_llama_gguf)
    params = SamplingParams(temperature=0.9, seed=3, max_tokens=20, ignore_eos=True)
    pieces, last = [], None
    for out in llm.stream("hello", params):
        pieces.append(out.outputs[0].delta_text)
        last = out
    assert last.finished and "".join(pieces) == last.outputs[0].text
    assert last.outputs[0].text == llm.tokenizer.decode(last.outputs[0].token_ids)


def test_stop_string_cuts_the_text_and_reports_it(tiny_llama_gguf):
    llm = make_llm(tiny_llama_gguf)
    free_run = llm.generate("the cat", SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))[0].outputs[0]
    text = free_run.text
    stop = text[len(text) // 2: len(text) // 2 + 2]
    assert stop.strip(), f"generated text too uniform to pick a stop string: {text!r}"
    out = llm.generate("the cat", SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop=[stop]))[0]
    completion = out.outputs[0]
    assert completion.finish_reason == "stop" and completion.stop_reason == stop
    assert completion.text == text[: text.index(stop)]
    kept = llm.generate("the cat", SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop=[stop],
                                                  include_stop_str_in_output=True))[0].outputs[0]
    assert kept.text == text[: text.index(stop) + len(stop)]


def test_stop_token_ids_and_max_tokens_set_the_finish_reason(tiny_llama_gguf):
    llm = make_llm(tiny_llama_gguf)
    free_run = llm.generate("the cat", SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0].outputs[0]
    assert free_run.finish_reason == "length" and len(free_run.token_ids) == 8
    stop_id = free_run.token_ids[3]
    out = llm.generate("the cat", SamplingParams(temperature=0, max_tokens=8, ignore_eos=True,
                                                 stop_token_ids=[stop_id]))[0].outputs[0]
    first = free_run.token_ids.index(stop_id)
    assert out.finish_reason == "stop" and out.stop_reason == stop_id
    assert out.token_ids == free_run.token_ids[: first + 1]


def test_logprobs_are_reported_per_token(tiny_llama_gguf):
    llm = make_llm(tiny_llama_gguf)
    out = llm.generate("the cat", SamplingParams(temperature=0, max_tokens=5, logprobs=3, ignore_eos=True))[0]
    lps = out.outputs[0].logprobs
    assert len(lps) == 5
    for token, lp in zip(out.outputs[0].token_ids, lps):
        assert lp.token_id == token and len(lp.top) == 3
        assert lp.top[0][0] == token  # greedy picks the most likely token
        assert lp.logprob <= 0


def test_prompt_longer_than_the_context_is_refused(tiny_llama_gguf):
    llm = make_llm(tiny_llama_gguf, max_model_len=32)
    with pytest.raises(PromptTooLongError, match="context window"):
        llm.generate("word " * 40, SamplingParams(max_tokens=4))
    with pytest.raises(PromptTooLongError, match="max_tokens"):
        llm.generate("word " * 10, SamplingParams(max_tokens=30))
    assert not llm.engine.has_unfinished_requests()


def test_requests_larger_than_the_kv_pool_are_refused(tiny_llama_gguf):
    llm = make_llm(tiny_llama_gguf, kv_cache_tokens=16)
    with pytest.raises(PromptTooLongError, match="KV pool"):
        llm.generate("word " * 10, SamplingParams(max_tokens=10))


def test_bad_token_ids_and_empty_prompts_are_refused(tiny_llama_gguf):
    llm = make_llm(tiny_llama_gguf)
    with pytest.raises(InvalidRequestError, match="vocabulary"):
        llm.generate([[1, 2, 10**9]], SamplingParams(max_tokens=2))
    with pytest.raises(InvalidRequestError, match="empty"):
        llm.generate("", SamplingParams(max_tokens=2))


def test_bad_engine_options_are_refused(tiny_llama_gguf):
    with pytest.raises(InvalidRequestError, match="dtype"):
        make_llm(tiny_llama_gguf, dtype="float8")
    with pytest.raises(InvalidRequestError, match="cuda"):
        if __import__("torch").cuda.is_available():
            pytest.skip("a GPU is present")
        make_llm(tiny_llama_gguf, device="cuda")


def test_vanishing_temperature_is_greedy_and_bad_stop_ids_are_refused(tiny_llama_gguf):
    llm = make_llm(tiny_llama_gguf)
    greedy = llm.generate("the cat", GREEDY)[0].outputs[0].token_ids
    tiny_t = SamplingParams(temperature=2e-309, max_tokens=12, ignore_eos=True)
    assert llm.generate("the cat", tiny_t)[0].outputs[0].token_ids == greedy
    with pytest.raises(InvalidRequestError, match="stop_token_ids"):
        llm.generate("the cat", SamplingParams(max_tokens=4, min_tokens=2, stop_token_ids=[10**7]))
    assert not llm.engine.has_unfinished_requests()

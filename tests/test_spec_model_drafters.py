"""Model drafters (draft model, layer skipping): layer selection, weight sharing, the shadow KV's
sync and rollback (a full-depth view drafts exactly what the target decodes), a full draft pool."""

import pytest
import torch

from thrifty.engine.sampling_params import SamplingParams
from thrifty.errors import InvalidRequestError
from thrifty.spec.layer_skip import default_kept_layers, layer_skip_view
from tests.fixtures.tiny_models import make_tiny_llm as make_llm

PROMPTS = ["the cat sat on the mat, the cat sat on the", "hello world, this is a longer prompt; hello", "a"]


def greedy(**extra) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, **extra)


def test_kept_layers_keep_both_ends_and_the_asked_share():
    kept = default_kept_layers(30, 0.5)
    assert len(kept) == 15 and kept == sorted(set(kept))
    assert {0, 1, 28, 29} <= set(kept)
    assert default_kept_layers(4, 0.5) == [0, 3]
    assert default_kept_layers(3, 0.5) == [0, 2]
    assert default_kept_layers(6, 1.0) == list(range(6))
    with pytest.raises(ValueError):
        default_kept_layers(6, 0.0)


def test_layer_skip_view_shares_weights_but_not_kv(tiny_llama_gguf):
    llm = make_llm(tiny_llama_gguf)
    target = llm.engine.model
    view = layer_skip_view(target, [0, 1])
    assert len(view.model.layers) == 2 and len(target.model.layers) > 2
    assert view.model.layers[1].mlp is target.model.layers[1].mlp  # same weights, not copies
    caches = [(torch.zeros(8, *target.kv_cache_shape()), torch.zeros(8, *target.kv_cache_shape())) for _ in range(2)]
    target_cache = target.model.layers[0].self_attn.k_cache
    view.bind_kv_cache(caches)
    assert view.model.layers[0].self_attn.k_cache is caches[0][0]
    assert target.model.layers[0].self_attn.k_cache is target_cache


def test_full_depth_view_drafts_exactly_the_targets_tokens(tiny_llama_gguf):
    """With every layer kept the drafter is the target: every draft token must be accepted,
    which only holds if the shadow cache syncs and rolls back correctly step after step."""
    reference = [o.outputs[0].token_ids for o in make_llm(tiny_llama_gguf).generate(PROMPTS, greedy())]
    llm = make_llm(tiny_llama_gguf, speculative_adaptive=False, num_speculative_tokens=4)
    engine = llm.engine
    depth = engine.model_config.num_layers
    engine.speculator.proposers["layerskip"] = engine._model_drafter(
        "layerskip", layer_skip_view(engine.model, list(range(depth))))
    outputs = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, greedy(speculative="layerskip"))]
    assert outputs == reference
    stats = engine.stats()
    assert stats["spec_layerskip_draft_tokens"] > 0
    assert stats["spec_layerskip_acceptance_rate"] > 0.95


def test_a_drafter_reads_accepted_tokens_as_decode_rows(tiny_llama_gguf):
    """After a fully accepted draft the drafter reads two tokens (the last draft token and the target's
    own); those run as two decode rows per sequence, and a full-depth drafter still drafts the target's tokens."""
    reference = [o.outputs[0].token_ids for o in make_llm(tiny_llama_gguf).generate(PROMPTS[:2], greedy())]
    llm = make_llm(tiny_llama_gguf, speculative_adaptive=False, num_speculative_tokens=4)
    engine = llm.engine
    drafter = engine._model_drafter("layerskip", layer_skip_view(engine.model, list(range(engine.model_config.num_layers))))
    engine.speculator.proposers["layerskip"] = drafter
    query_lens = []
    original = drafter.runner._execute_decode
    drafter.runner._execute_decode = lambda batch, query_len: query_lens.append(query_len) or original(batch, query_len)
    outputs = [llm.generate(p, greedy(speculative="layerskip"))[0].outputs[0].token_ids for p in PROMPTS[:2]]
    assert outputs == reference
    assert 2 in query_lens and engine.stats()["spec_layerskip_acceptance_rate"] > 0.95


def test_a_full_draft_pool_only_stops_drafting(tiny_llama_gguf):
    reference = [o.outputs[0].token_ids for o in make_llm(tiny_llama_gguf).generate(PROMPTS, greedy())]
    llm = make_llm(tiny_llama_gguf, speculative_adaptive=False, speculative_draft_kv_tokens=12)
    outputs = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, greedy(speculative="draft"))]
    assert outputs == reference
    drafter = llm.engine.speculator.proposers["draft"]
    assert llm.engine.stats()["spec_draft_drafts"] > 0  # the short prompt fits and drafts
    too_long = [shadow for seq, shadow in drafter.shadows.items() if seq.num_tokens > 12]
    assert too_long and all(shadow.num_cached_slots == 0 for shadow in too_long)  # dropped, not overfilled
    llm.generate("b", greedy(speculative="draft"))
    assert len(drafter.shadows) <= 1  # finished sequences' shadows are released


def test_draft_model_with_another_vocabulary_is_refused(tiny_llama_gguf, monkeypatch):
    import dataclasses

    from thrifty.engine import engine as engine_module

    llm = make_llm(tiny_llama_gguf)
    real_open = engine_module.open_model_source

    def other_vocabulary(path):
        source = real_open(path)
        source.config = dataclasses.replace(source.config, vocab_size=source.config.vocab_size + 1)
        return source

    monkeypatch.setattr(engine_module, "open_model_source", other_vocabulary)
    with pytest.raises(InvalidRequestError, match="vocabulary"):
        llm.generate("a", greedy(speculative="draft"))
    assert not llm.engine.has_unfinished_requests()


def test_catch_up_is_priced_per_token(tiny_llama_gguf):
    from thrifty.engine.sequence import Sequence

    llm = make_llm(tiny_llama_gguf, speculative_adaptive=False, num_speculative_tokens=4)
    engine = llm.engine
    depth = engine.model_config.num_layers
    drafter = engine.speculator.proposers["layerskip"] = engine._model_drafter(
        "layerskip", layer_skip_view(engine.model, list(range(depth))))
    assert drafter.seconds_per_catch_up_token == 0.0
    llm.generate(PROMPTS[:1], greedy(speculative="layerskip"))
    rate = drafter.seconds_per_catch_up_token
    assert rate > 0  # the prompt (over 8 tokens) was read in one catch-up
    assert drafter.pending_seconds(Sequence("new", 0, list(range(40)), greedy())) == pytest.approx(40 * rate)
    assert drafter.pending_seconds(Sequence("short", 0, [1, 2, 3], greedy())) == 0.0  # fed with the first draft pass


def test_a_drafter_running_the_targets_layers_copies_the_prompts_kv_instead_of_reading_it(tiny_llama_gguf):
    reference = [o.outputs[0].token_ids for o in make_llm(tiny_llama_gguf).generate(PROMPTS, greedy())]
    llm = make_llm(tiny_llama_gguf, speculative_adaptive=False, num_speculative_tokens=3)
    engine = llm.engine
    kept = [0, engine.model_config.num_layers - 1]
    drafter = engine.speculator.proposers["layerskip"] = engine._model_drafter(
        "layerskip", layer_skip_view(engine.model, kept), kept)
    prompt = llm.tokenizer.encode(PROMPTS[0])
    assert len(prompt) > 8  # long enough that a drafter without the hand-off would read it in a catch-up
    engine.add_request("r", prompt, greedy(speculative="layerskip"))
    while not drafter.shadows:
        engine.step()
    (seq, shadow), = drafter.shadows.items()
    positions = len(prompt) - 1  # the last prompt token is fed with the first draft pass
    assert shadow.num_cached_slots >= positions
    target_slots = torch.tensor(engine.block_manager.slot_ids(seq, 0, positions))
    shadow_slots = torch.tensor(drafter.blocks.slot_ids(shadow, 0, positions))
    for i, layer in enumerate(kept):
        for target_cache, draft_cache in zip(engine.kv_cache.layers[layer], drafter.kv_cache.layers[i]):
            assert torch.equal(draft_cache[shadow_slots], target_cache[target_slots])
    assert drafter.seconds_per_catch_up_token == 0.0  # nothing was read
    assert drafter.pending_seconds(seq) == 0.0
    while engine.has_unfinished_requests():
        engine.step()
    outputs = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, greedy(speculative="layerskip"))]
    assert outputs == reference
    assert drafter.seconds_per_catch_up_token == 0.0


def test_only_a_drafter_of_the_targets_own_weights_is_given_its_kv(tiny_llama_gguf, tmp_path):
    from tests.fixtures.tiny_models import write_tiny_llama_gguf

    engine = make_llm(tiny_llama_gguf).engine
    assert engine.speculator.proposer("draft").target_kv is not None  # the target's file, int4 by default
    assert engine.speculator.proposer("layerskip").target_kv.layers == default_kept_layers(
        engine.model_config.num_layers, 0.5)
    other = tmp_path / "other.gguf"
    write_tiny_llama_gguf(other, seed=1)
    engine = make_llm(tiny_llama_gguf, speculative_draft_model=str(other)).engine
    assert engine.speculator.proposer("draft").target_kv is None


@pytest.mark.parametrize("kv_dtype", ["int8", "kivi4"])
def test_the_kv_hand_off_reads_a_quantized_target_cache_and_skips_evicted_sequences(tiny_llama_gguf, kv_dtype):
    from thrifty.kv.quant import as_store

    plain = make_llm(tiny_llama_gguf, kv_cache_dtype=kv_dtype)
    reference = [o.outputs[0].token_ids for o in plain.generate(PROMPTS, greedy())]
    llm = make_llm(tiny_llama_gguf, kv_cache_dtype=kv_dtype, speculative_adaptive=False, num_speculative_tokens=3)
    engine = llm.engine
    kept = [0, engine.model_config.num_layers - 1]
    drafter = engine.speculator.proposers["layerskip"] = engine._model_drafter(
        "layerskip", layer_skip_view(engine.model, kept), kept)
    prompt = llm.tokenizer.encode(PROMPTS[0])
    engine.add_request("r", prompt, greedy(speculative="layerskip"))
    while not drafter.shadows:
        engine.step()
    (seq, shadow), = drafter.shadows.items()
    positions = len(prompt) - 1
    target_slots = torch.tensor(engine.block_manager.slot_ids(seq, 0, positions))
    shadow_slots = torch.tensor(drafter.blocks.slot_ids(shadow, 0, positions))
    for i, layer in enumerate(kept):
        expected = as_store(*engine.kv_cache.layers[layer]).gather(target_slots)
        copied = as_store(*drafter.kv_cache.layers[i]).gather(shadow_slots)
        assert all(torch.equal(c, e) for c, e in zip(copied, expected))
    while engine.has_unfinished_requests():
        engine.step()
    assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS, greedy(speculative="layerskip"))] == reference
    assert drafter.seconds_per_catch_up_token == 0.0
    # An evicted sequence's slots are not its positions: the drafter reads its prompt instead.
    evicted = greedy(speculative="layerskip", kv_policy="streaming_llm", kv_budget=8)
    assert len(llm.generate(PROMPTS[0] + " " + PROMPTS[0], evicted)[0].outputs[0].token_ids) == 20
    assert engine.kv_compressor.stats.compactions > 0
    assert drafter.seconds_per_catch_up_token > 0.0

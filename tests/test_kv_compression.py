"""KV eviction through the engine: exactness at full budget, real freeing, batching, prefix sharing."""

import pytest
import torch

from thrifty.api import LLM
from thrifty.engine.sampling_params import SamplingParams
from thrifty.engine.sequence import Sequence
from thrifty.errors import InvalidRequestError
from thrifty.kv.blocks import BlockManager
from thrifty.kv.policies import POLICIES

PROMPT = ("hello world, this is a longer prompt that needs more than one block of the cache "
          "and then some more words so that eviction has something to choose from")
MAX_TOKENS = 16


def greedy(**kv) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, **kv)


@pytest.fixture(scope="module")
def llm(tiny_llama_gguf):
    return LLM(str(tiny_llama_gguf), kv_cache_tokens=4096, block_size=4)


@pytest.fixture(scope="module")
def baseline(llm):
    return llm.generate(PROMPT, greedy())[0].outputs[0].token_ids


def tokens(llm, params, prompt=PROMPT):
    return llm.generate(prompt, params)[0].outputs[0].token_ids


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_budget_at_sequence_length_reproduces_full_cache(llm, baseline, policy):
    n = len(llm.tokenizer.encode(PROMPT)) + MAX_TOKENS
    # n - 1: the policy is live (observer attached, scores gathered) but never has to evict.
    for budget in (n - 1, n, 10 * n):
        assert tokens(llm, greedy(kv_policy=policy, kv_budget=budget)) == baseline, budget
    assert llm.engine.kv_compressor.stats.compactions == 0


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_compression_frees_blocks_during_generation(llm, policy):
    engine = llm.engine
    blocks = engine.block_manager
    prompt_len = len(llm.tokenizer.encode(PROMPT))
    budget = 8
    engine.add_request("r", PROMPT, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True,
                                                   kv_policy=policy, kv_budget=budget))
    seq = engine.requests["r"].seqs[0]
    peak_after_prefill = largest = 0
    while engine.has_unfinished_requests():
        engine.step()
        if not seq.is_finished and not seq.in_prefill:
            # Layers share blocks sized for the largest layer budget (the budget itself unless per-layer).
            layer_budgets = engine.kv_compressor._states[seq].layer_budgets
            assert abs(sum(layer_budgets) - budget * len(layer_budgets)) <= len(layer_budgets)
            largest = max(layer_budgets)
            # Never more than that + one block of slack after a step, whatever the sequence length.
            assert seq.num_cached_slots < largest + blocks.block_size
            assert len(seq.block_table) == blocks.blocks_for(seq.num_cached_slots)
            # mikv's side store holds blocks outside the table too, charged apart (tests/test_kv_mikv.py)
            peak_after_prefill = max(peak_after_prefill, blocks.num_used_blocks - blocks.num_side_blocks)
            assert seq.num_computed_tokens == seq.num_tokens - 1
    assert peak_after_prefill <= blocks.blocks_for(largest + blocks.block_size)
    assert blocks.blocks_for(prompt_len) > peak_after_prefill
    assert blocks.num_free_blocks == blocks.num_blocks


def test_mixed_policies_in_one_batch_match_each_alone(llm):
    prompts = [PROMPT, PROMPT[::-1], "the cat sat on the mat " * 6, "one two three four five six seven " * 4]
    params = [greedy(kv_policy="snapkv", kv_budget=0.5), greedy(kv_policy="h2o", kv_budget=12),
              greedy(), greedy(kv_policy="streaming_llm", kv_budget=10)]
    alone = [tokens(llm, p, prompt) for prompt, p in zip(prompts, params)]
    together = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert together == alone


def test_chunked_prefill_compresses_once_at_the_end(tiny_llama_gguf):
    """The prompt is compressed once, after its last chunk, keeping what a whole-prompt prefill keeps.

    Kept positions are compared rather than generated tokens: float32 matmuls of 8-row chunks and
    of the whole prompt round differently (thrifty.models.layers.dense_linear), which may flip a
    near-tie in the tiny random model's greedy choice without any eviction being involved. For the
    same reason K-norm's near-equal key norms (random weights) may swap a kept token or two.
    """
    def first_compression(llm, policy):
        compressor, seen = llm.engine.kv_compressor, []
        original = compressor.compress

        def recording(seq, state):
            computed = seq.num_computed_tokens
            original(seq, state)
            seen.append((computed, seq.prompt_len, [p.clone() for p in state.positions]))

        compressor.compress = recording
        llm.generate(PROMPT, greedy(kv_policy=policy, kv_budget=10))
        compressor.compress = original
        return seen[0]

    chunked = LLM(str(tiny_llama_gguf), kv_cache_tokens=4096, block_size=4, max_num_batched_tokens=8)
    whole = LLM(str(tiny_llama_gguf), kv_cache_tokens=4096, block_size=4)
    for policy in ("streaming_llm", "knorm"):  # attention-free: the selection cannot depend on chunking
        computed, prompt_len, kept_chunked = first_compression(chunked, policy)
        assert prompt_len > 8 and computed == prompt_len  # not before the last chunk
        _, _, kept_whole = first_compression(whole, policy)
        for a, b in zip(kept_chunked, kept_whole):  # per layer [kv_heads, kept]
            if policy == "streaming_llm":  # positions only: exactly the same
                assert torch.equal(a, b)
            for head_a, head_b in zip(a.tolist(), b.tolist()):
                assert len(set(head_a) & set(head_b)) >= 0.8 * len(head_a)


def test_shared_prefix_is_never_corrupted(llm, baseline):
    # The same prompt twice at once: the second claims the first's blocks through the prefix cache.
    # The compressed one must copy-on-write; the uncompressed one must still give the full-cache output.
    outs = llm.generate([PROMPT, PROMPT, PROMPT],
                        [greedy(), greedy(kv_policy="h2o", kv_budget=8), greedy()])
    assert outs[0].outputs[0].token_ids == baseline
    assert outs[2].outputs[0].token_ids == baseline
    # n=2 samples share their prompt blocks too.
    out = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, n=2,
                                              kv_policy="tova", kv_budget=8))[0]
    assert out.outputs[0].token_ids == out.outputs[1].token_ids
    assert tokens(llm, greedy()) == baseline  # the prefix cache still serves the right content
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks


def test_preempted_sequences_are_recomputed_then_recompressed(tiny_llama_gguf):
    small = LLM(str(tiny_llama_gguf), kv_cache_tokens=96, block_size=4, max_num_batched_tokens=16)
    prompts = [f"{i} {PROMPT[:100]}" for i in range(4)]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, kv_policy="knorm", kv_budget=0.8)
    outs = small.generate(prompts, params)
    assert small.engine.scheduler.num_preemptions > 0
    assert all(len(o.outputs[0].token_ids) == 24 for o in outs)
    assert small.engine.block_manager.num_free_blocks == small.engine.block_manager.num_blocks


def test_compaction_layout(tiny_llama_gguf):
    """Drive the mechanism directly: kept slots land at the front, per head, and the tail is freed."""
    llm = LLM(str(tiny_llama_gguf), kv_cache_tokens=256, block_size=4)
    engine = llm.engine
    compressor, cache, blocks = engine.kv_compressor, engine.kv_cache, engine.block_manager
    params = SamplingParams(max_tokens=None, kv_policy="knorm", kv_budget=5)
    seq = Sequence("x", 0, list(range(1, 14)), params)
    compressor.add(seq)
    blocks.claim_cached_prefix(seq)
    blocks.append_slots(seq, 13)
    seq.num_computed_tokens = 13
    for k, v in cache.layers:
        k.normal_(), v.normal_()
    state = compressor._states[seq]
    keep = compressor.select(seq, state, [5] * compressor.num_layers, [0] * compressor.num_layers)
    slots = compressor._slot_ids(seq)
    before = [(k[slots].clone(), v[slots].clone()) for k, v in cache.layers]
    free_before = blocks.num_free_blocks
    compressor.compress(seq, state)
    assert seq.num_cached_slots == 5 and len(seq.block_table) == 2 and seq.num_computed_tokens == 13
    assert blocks.num_free_blocks == free_before + 2
    front = compressor._slot_ids(seq)
    assert torch.equal(state.positions[0], keep[0])  # each head remembers which tokens it kept
    for (k, v), (k0, v0), idx in zip(cache.layers, before, keep):
        for h in range(k.shape[1]):
            assert torch.equal(k[front, h], k0[idx[h], h]) and torch.equal(v[front, h], v0[idx[h], h])
    blocks.free(seq)


def test_shared_prefix_is_pinned_when_no_block_is_free_for_a_copy(tiny_llama_gguf):
    small = LLM(str(tiny_llama_gguf), kv_cache_tokens=96, block_size=4, max_num_batched_tokens=16)
    prompts = [PROMPT[:100] + str(i) for i in range(4)]  # one shared prefix, a full pool
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, kv_policy="knorm", kv_budget=0.8)
    outs = small.generate(prompts, params)
    assert small.engine.kv_compressor.stats.pinned > 0
    alone = LLM(str(tiny_llama_gguf), kv_cache_tokens=4096, block_size=4, enable_prefix_caching=False)
    # The uncompressed neighbour that shares the prefix still gives its full-cache output.
    plain = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    mixed = small.generate(prompts[:2], [params, plain])
    assert mixed[1].outputs[0].token_ids == alone.generate(prompts[1], plain)[0].outputs[0].token_ids
    assert len(outs) == 4 and small.engine.block_manager.num_free_blocks == small.engine.block_manager.num_blocks


def test_blocks_compact_copies_shared_blocks_on_write():
    blocks = BlockManager(num_blocks=8, block_size=2)
    a = Sequence("a", 0, [1, 2, 3, 4, 5], SamplingParams())
    blocks.claim_cached_prefix(a)
    blocks.append_slots(a, 5)
    a.num_computed_tokens = 5
    blocks.commit(a)
    b = Sequence("b", 0, [1, 2, 3, 4, 5], SamplingParams())
    assert blocks.claim_cached_prefix(b) == 4  # b shares a's two full blocks
    shared = list(a.block_table[:2])
    blocks.append_slots(b, 1)
    assert blocks.compact(b, 3)
    assert b.block_table[0] not in shared and b.block_table[1] not in shared  # private copies
    assert a.block_table[:2] == shared and all(blocks.ref_counts[x] == 1 for x in shared)
    assert blocks.cached_prefix_blocks(Sequence("c", 0, [1, 2, 3, 4, 5], SamplingParams())) == 2
    blocks.free(b)
    blocks.free(a)
    assert blocks.num_free_blocks == 8


def test_invalid_combinations_are_refused(llm, tiny_gemma3_gguf):
    with pytest.raises(InvalidRequestError, match="without a kv_policy"):
        llm.generate(PROMPT, greedy(kv_budget=8))
    with pytest.raises(InvalidRequestError, match="needs a kv_budget"):
        llm.generate(PROMPT, greedy(kv_policy="h2o"))
    gemma = LLM(str(tiny_gemma3_gguf), kv_cache_tokens=512, block_size=4)
    with pytest.raises(InvalidRequestError, match="sliding-window"):
        gemma.generate(PROMPT, greedy(kv_policy="h2o", kv_budget=8))


def test_engine_default_policy_and_opt_out(tiny_llama_gguf, baseline):
    llm = LLM(str(tiny_llama_gguf), kv_cache_tokens=4096, block_size=4, kv_policy="streaming_llm", kv_budget=8)
    assert tokens(llm, greedy(kv_policy="none")) == baseline
    assert tokens(llm, greedy()) == tokens(llm, greedy(kv_policy="streaming_llm", kv_budget=8))
    assert llm.engine.kv_compressor.stats.compactions > 0


# Per-layer budgets on the 3-layer tiny model: PyramidKV keeps 27, 16 and 5 of the prompt's 94 slots.
PYRAMID = {"kv_policy": "pyramidkv", "kv_budget": 16, "kv_policy_options": {"window_size": 4}}
D2O = {"kv_policy": "d2o", "kv_budget": 0.5}


def test_per_layer_budgets_share_blocks_sized_for_the_largest(llm):
    engine = llm.engine
    blocks, compressor = engine.block_manager, engine.kv_compressor
    engine.add_request("p", PROMPT, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, **PYRAMID))
    seq = engine.requests["p"].seqs[0]
    compactions = compressor.stats.compactions
    while seq.in_prefill:
        engine.step()
    state = compressor._states[seq]
    budgets = state.layer_budgets
    assert budgets == sorted(budgets, reverse=True) and budgets[0] > budgets[-1] and sum(budgets) == 3 * 16
    assert state.lengths.kept == tuple(budgets) and state.lengths.shared == budgets[0] == seq.num_cached_slots
    assert blocks.num_used_blocks == blocks.blocks_for(budgets[0])
    # each layer's positions: its own kept tokens first, then filler, all distinct
    for layer, size in enumerate(budgets):
        kept = state.positions[layer][:, :size]
        assert all(len(set(row.tolist())) == budgets[0] for row in state.positions[layer])
        assert torch.equal(kept, kept.sort(dim=1).values)
    while engine.has_unfinished_requests():
        engine.step()
        if not seq.is_finished:
            assert seq.num_cached_slots < budgets[0] + blocks.block_size
            assert state.lengths.kept == tuple(budgets)  # decode-time compaction goes back to each layer's own
    assert compressor.stats.compactions > compactions + 1
    assert blocks.num_free_blocks == blocks.num_blocks


def test_per_layer_sequences_batched_with_plain_ones_match_each_alone(tiny_llama_gguf):
    # Without prefix caching: a prompt partly found in the cache is observed by fewer queries, which
    # changes attention statistics whatever the batch.
    llm = LLM(str(tiny_llama_gguf), kv_cache_tokens=4096, block_size=4, enable_prefix_caching=False)
    prompts = [PROMPT, PROMPT[::-1], "the cat sat on the mat " * 6, "one two three four five six seven " * 4]
    params = [greedy(**PYRAMID), greedy(), greedy(**D2O), greedy(kv_policy="h2o", kv_budget=12)]
    alone = [tokens(llm, p, prompt) for prompt, p in zip(prompts, params)]
    together = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert together == alone
    assert tokens(llm, greedy(), PROMPT[::-1]) == alone[1]
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks


def test_d2o_layers_differ_and_merging_changes_kept_values(llm):
    engine = llm.engine
    engine.add_request("d", PROMPT, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, **D2O))
    seq = engine.requests["d"].seqs[0]
    while seq.in_prefill:
        engine.step()
    state = engine.kv_compressor._states[seq]
    assert len(set(state.layer_budgets)) > 1 and state.lengths is not None
    assert abs(sum(state.layer_budgets) - 3 * state.budget) <= 3  # mean = the budget, up to rounding
    # Some kept slot of some layer no longer holds its token's original key: evicted tokens were merged in.
    k_cache = engine.kv_cache.layers[1][0]
    slots = engine.kv_compressor._slot_ids(seq)[:state.lengths.kept[1]]
    kept = k_cache[slots].transpose(0, 1)  # [kv_heads, kept, head_dim]
    engine.add_request("full", PROMPT, SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    full = engine.requests["full"].seqs[0]
    while full.in_prefill:
        engine.step()
    original = k_cache[engine.kv_compressor._slot_ids(full)].transpose(0, 1)
    positions = state.positions[1][:, :state.lengths.kept[1]]
    reference = original.gather(1, positions[..., None].expand(-1, -1, original.shape[-1]))
    assert not torch.allclose(kept, reference)
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


@pytest.mark.parametrize("kv", [PYRAMID, D2O], ids=["pyramidkv", "d2o"])
def test_per_layer_budgets_with_shared_prefixes_and_preemption(tiny_llama_gguf, llm, baseline, kv):
    outs = llm.generate([PROMPT, PROMPT, PROMPT], [greedy(), greedy(**kv), greedy()])
    assert outs[0].outputs[0].token_ids == baseline and outs[2].outputs[0].token_ids == baseline
    small = LLM(str(tiny_llama_gguf), kv_cache_tokens=96, block_size=4, max_num_batched_tokens=16)
    prompts = [f"{i} {PROMPT[:100]}" for i in range(4)]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, **kv)
    outs = small.generate(prompts, params)
    assert small.engine.scheduler.num_preemptions > 0 and small.engine.kv_compressor.stats.compactions > 0
    assert all(len(o.outputs[0].token_ids) == 24 for o in outs)
    assert small.engine.block_manager.num_free_blocks == small.engine.block_manager.num_blocks


def test_per_layer_budgets_with_speculative_drafts(tiny_llama_gguf):
    """Drafts go after the shared slots, so every layer sees them; rejected ones roll back to at least the
    shared slot count, never into a layer's kept slots."""
    llm = LLM(str(tiny_llama_gguf), kv_cache_tokens=4096, block_size=4, speculative_adaptive=False)
    engine = llm.engine
    prompt = "the cat sat on the mat, the cat sat on the mat, the cat sat on the" * 2
    engine.add_request("s", prompt, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, speculative="ngram",
                                                   **PYRAMID))
    seq = engine.requests["s"].seqs[0]
    while engine.has_unfinished_requests():
        engine.step()
        state = engine.kv_compressor._states.get(seq)
        if state is not None and state.lengths is not None:
            assert state.lengths.shared <= seq.num_cached_slots < state.lengths.shared + 4 + 5
            assert state.lengths.kept == tuple(state.layer_budgets)
    assert engine.stats()["spec_ngram_drafts"] > 0 and engine.kv_compressor.stats.compactions > 1
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks

"""MiKV: evicted tokens kept in low precision. The split, the side store, attention over both, the engine."""

import pytest
import torch

from tests.fixtures.tiny_models import make_tiny_llm
from thrifty.api import LLM
from thrifty.engine.sampling_params import SamplingParams
from thrifty.engine.sequence import Sequence
from thrifty.errors import InvalidRequestError
from thrifty.kv.compression import keep_indices
from thrifty.kv.policies import MiKVPolicy, make_policy
from thrifty.kv.quant.lowbit import LowPrecisionTokens
from thrifty.models.paged_attention import AttentionMetadata, SequenceSlice, paged_attention

PROMPT = ("hello world, this is a longer prompt that needs more than one block of the cache "
          "and then some more words so that eviction has something to choose from")
MAX_TOKENS = 16


def greedy(**kv) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, **kv)


def tokens(llm, params, prompt=PROMPT):
    return llm.generate(prompt, params)[0].outputs[0].token_ids


def bound(x: torch.Tensor, dim: int, bits: int) -> torch.Tensor:
    """quantize_asym's error bound for groups along `dim`: scale / 2 plus float16 rounding of scale and zero."""
    lo, hi = x.amin(dim=dim, keepdim=True), x.amax(dim=dim, keepdim=True)
    return (hi - lo) / (2 ** bits - 1) / 2 + (lo.abs() + hi - lo) * 2.0 ** -10 + 1e-6


@pytest.fixture(scope="module")
def llm(tiny_llama_gguf):
    return LLM(str(tiny_llama_gguf), kv_cache_tokens=4096, block_size=4)


# -- the side store --------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 4])
def test_side_store_dequantizes_within_the_error_bound(bits):
    torch.manual_seed(0)
    store = LowPrecisionTokens(num_layers=2, bits=bits, group_size=4)
    batches = []
    for count in (6, 3):  # two compactions: groups of 4 + 2, then 3
        keys = [torch.randn(2, count, 8) * 3 for _ in range(2)]
        keys[0][:, :, 5] += 40.0  # an outlier channel: per-channel groups keep it out of the other channels' range
        values = [torch.randn(2, count, 8) for _ in range(2)]
        store.append(keys, values)
        batches.append((keys, values))
    assert store.num_tokens == 9 and store.num_groups == 3
    for layer in range(2):
        k, v = store.layer(layer, torch.float32)
        assert k.shape == v.shape == (2, 9, 8)
        k_ref = torch.cat([b[0][layer] for b in batches], dim=1)
        v_ref = torch.cat([b[1][layer] for b in batches], dim=1)
        key_bound = torch.cat([bound(k_ref[:, a:b], 1, bits).expand(-1, b - a, -1)
                               for a, b in ((0, 4), (4, 6), (6, 9))], dim=1)
        assert ((k - k_ref).abs() <= key_bound).all()
        assert ((v - v_ref).abs() <= bound(v_ref, -1, bits)).all()
        assert not torch.equal(k, k_ref)  # really quantized


def test_side_store_bytes_are_what_it_holds():
    store = LowPrecisionTokens(num_layers=3, bits=2, group_size=4)
    assert store.nbytes == 0
    store.append([torch.randn(2, 5, 8)] * 3, [torch.randn(2, 5, 8)] * 3)
    # per layer: codes 2 * (2 heads * 5 tokens * 8 dims * 2 bits / 8), value scale+zero 2 * 2 * 5 * 2 bytes,
    # key scale+zero for 2 groups: 2 * 2 * 2 * 8 * 2 bytes; plus 5 int32 group ids
    per_layer = 2 * 2 * 5 * 2 + 2 * 2 * 5 * 2 + 2 * 2 * 2 * 8 * 2
    assert store.nbytes == 3 * per_layer + 5 * 4
    with pytest.raises(ValueError, match="same number"):
        store.append([torch.randn(2, 5, 8), torch.randn(2, 4, 8), torch.randn(2, 5, 8)], [torch.randn(2, 5, 8)] * 3)
    with pytest.raises(ValueError, match="2 or 4"):
        LowPrecisionTokens(num_layers=1, bits=3)


# -- attention over both ------------------------------------------------------------------------


def test_attention_takes_one_softmax_over_kept_and_demoted_tokens():
    """The same as plain attention over a cache holding the dequantized demoted tokens before the kept ones."""
    torch.manual_seed(1)
    heads, kv_heads, dim = 4, 2, 8
    store = LowPrecisionTokens(num_layers=1, bits=2)
    store.append([torch.randn(kv_heads, 5, dim)], [torch.randn(kv_heads, 5, dim)])
    low_k, low_v = store.layer(0, torch.float32)
    k_cache, v_cache = torch.randn(16, kv_heads, dim), torch.randn(16, kv_heads, dim)
    q, k, v = torch.randn(3, heads, dim), torch.randn(3, kv_heads, dim), torch.randn(3, kv_heads, dim)
    slots = torch.arange(6)  # 3 cached + 3 new (a prefill chunk: causal mask over the new ones)
    seen = []
    meta = AttentionMetadata(slot_mapping=slots[3:], sequences=[
        SequenceSlice(0, 3, 6, slots, demoted=store, observer=lambda layer, probs: seen.append(probs))])
    out = paged_attention(q, k, v, k_cache.clone(), v_cache.clone(), meta, scale=0.5, layer=0)
    # reference: the demoted tokens written into slots 8..12 of a plain cache, attended first
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    ref_k[8:13], ref_v[8:13] = low_k.transpose(0, 1), low_v.transpose(0, 1)
    ref_slots = torch.cat((torch.arange(8, 13), slots))
    ref_meta = AttentionMetadata(slot_mapping=slots[3:], sequences=[SequenceSlice(0, 3, 11, ref_slots)])
    ref = paged_attention(q, k, v, ref_k, ref_v, ref_meta, scale=0.5, layer=0)
    torch.testing.assert_close(out, ref)
    assert seen[0].shape == (heads, 3, 6)  # the policy sees the cached slots only
    assert (seen[0].sum(-1) < 1 - 1e-4).all()  # ... of a softmax that also covered the demoted tokens


# -- the split ------------------------------------------------------------------------------------


def test_compaction_keeps_the_important_tokens_and_demotes_the_others(tiny_llama_gguf):
    """H2O's rule on a hand-made statistic decides, per head, who stays in full precision; every
    other token lands in the side store, within the quantization error of its original K/V."""
    llm = LLM(str(tiny_llama_gguf), kv_cache_tokens=256, block_size=4)
    engine = llm.engine
    compressor, cache = engine.kv_compressor, engine.kv_cache
    params = SamplingParams(max_tokens=None, kv_policy="mikv", kv_budget=6, kv_policy_options={"group_size": 8})
    seq = Sequence("x", 0, list(range(1, 15)), params)
    compressor.add(seq)
    engine.block_manager.claim_cached_prefix(seq)
    engine.block_manager.append_slots(seq, 14)
    seq.num_computed_tokens = 14
    torch.manual_seed(2)
    for k, v in cache.layers:
        k.normal_(), v.normal_()
    state = compressor._states[seq]
    heads = compressor.num_kv_heads
    # a statistic per head: head h values token t by (t * (h + 2)) % 14, a different order per head
    stat = torch.stack([(torch.arange(14) * (h + 2)) % 14 for h in range(heads)]).float()
    state.stats = [stat.clone() for _ in range(compressor.num_layers)]
    window = MiKVPolicy().window(6)  # H2O: half the budget is the recent window
    assert window == 3
    expected = keep_indices(stat, 6, window)
    for h in range(heads):  # the rule by hand: slots 11..13, then the three best-valued of the rest
        best = sorted(range(11), key=lambda t: -float(stat[h, t]))[:3]
        assert expected[h].tolist() == sorted(best + [11, 12, 13])
    slots = compressor._slot_ids(seq)
    before = [(k[slots].clone(), v[slots].clone()) for k, v in cache.layers]
    compressor.compress(seq, state)
    assert seq.num_cached_slots == 6
    demoted = state.demoted
    assert demoted.num_tokens == 8 and compressor.stats.demoted_slots == 8
    for layer, (k0, v0) in enumerate(before):
        assert torch.equal(state.positions[layer], expected)
        low_k, low_v = demoted.layer(layer, torch.float32)
        for h in range(heads):
            out = sorted(set(range(14)) - set(expected[h].tolist()))
            k_ref, v_ref = k0[out, h], v0[out, h]  # [8, head_dim], in position order
            assert ((low_k[h] - k_ref).abs() <= bound(k_ref, 0, 2)).all()  # one group of 8 per channel
            assert ((low_v[h] - v_ref).abs() <= bound(v_ref, -1, 2)).all()
    # the next prompt's attention sees them: the runner is handed the side store
    assert compressor.prepare(seq)[2] is demoted
    engine.block_manager.free(seq)


# -- through the engine ---------------------------------------------------------------------------


def test_budget_at_sequence_length_reproduces_the_full_cache(llm):
    baseline = tokens(llm, greedy())
    n = len(llm.tokenizer.encode(PROMPT)) + MAX_TOKENS
    for budget in (n - 1, n):
        assert tokens(llm, greedy(kv_policy="mikv", kv_budget=budget)) == baseline
    assert llm.engine.kv_compressor.stats.demoted_slots == 0


class LogitsRecorder:
    """A sampler forcing the text's next token and keeping each sequence's log-softmax rows."""

    def __init__(self, text: list[int]) -> None:
        self.text, self.rows = text, {}

    def __call__(self, logits, seqs):
        logp = torch.log_softmax(logits.float(), dim=-1)
        for row, seq in enumerate(seqs):
            self.rows.setdefault(seq.request_id, []).append(logp[row])
        return [self.text[seq.num_tokens] for seq in seqs], [None] * len(seqs)


def test_mikv_stays_much_closer_to_the_full_cache_than_h2o(tiny_llama_gguf):
    """Decode-time compression to 16 slots of a 160-token text: the KL divergence from the full cache's
    next-token distributions, over the positions after the first compaction. Dropping the evicted
    tokens (h2o) loses far more than keeping them at 2 bits (mikv), and 4 bits beats 2."""
    llm = make_tiny_llm(tiny_llama_gguf, kv_cache_tokens=4096, enable_prefix_caching=False)
    text = [(37 * i * i + 11 * i + 5) % 250 + 1 for i in range(160)]
    prompt = 24
    runs = {"full": {}, "h2o": {"kv_policy": "h2o", "kv_budget": 16},
            "mikv2": {"kv_policy": "mikv", "kv_budget": 16},
            "mikv4": {"kv_policy": "mikv", "kv_budget": 16, "kv_policy_options": {"bits": 4}}}
    engine = llm.engine
    recorder, saved = LogitsRecorder(text), engine.sampler
    engine.sampler = recorder
    try:
        for name, kv in runs.items():
            engine.add_request(name, text[:prompt], SamplingParams(max_tokens=len(text) - prompt, ignore_eos=True, **kv))
        while engine.has_unfinished_requests():
            engine.step()
    finally:
        engine.sampler = saved
    full = torch.stack(recorder.rows["full"])

    def kl(name: str) -> float:
        logp = torch.stack(recorder.rows[name])
        return float((full.exp() * (full - logp)).sum(-1).mean())

    assert kl("h2o") > 0.01  # eviction does change this model's predictions
    assert kl("mikv2") < 0.3 * kl("h2o")
    assert kl("mikv4") < 0.5 * kl("mikv2")
    assert engine.kv_compressor.demoted_nbytes == 0  # every side store went with its sequence


def test_mixed_policies_in_one_batch_match_each_alone(tiny_llama_gguf):
    llm = LLM(str(tiny_llama_gguf), kv_cache_tokens=4096, block_size=4, enable_prefix_caching=False)
    prompts = [PROMPT, PROMPT[::-1], "the cat sat on the mat " * 6, "one two three four five six seven " * 4]
    params = [greedy(kv_policy="mikv", kv_budget=10), greedy(kv_policy="h2o", kv_budget=12), greedy(),
              greedy(kv_policy="mikv", kv_budget=0.3, kv_policy_options={"bits": 4, "importance": "knorm"})]
    alone = [tokens(llm, p, prompt) for prompt, p in zip(prompts, params)]
    together = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert together == alone
    assert llm.engine.kv_compressor.stats.demoted_slots > 0


def test_side_store_memory_is_counted_and_freed(llm):
    engine = llm.engine
    compressor, blocks = engine.kv_compressor, engine.block_manager
    engine.add_request("m", PROMPT, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True,
                                                   kv_policy="mikv", kv_budget=8))
    seq = engine.requests["m"].seqs[0]
    config, bs = engine.model_config, blocks.block_size
    checked = 0
    while engine.has_unfinished_requests():
        engine.step()
        state = compressor._states.get(seq)
        if seq.is_finished or state is None or state.demoted is None:
            continue
        held = state.demoted.num_tokens
        # every token is either a kept slot or a demoted one
        assert held + seq.num_cached_slots == seq.num_computed_tokens
        # the side store is charged to the pool: whole blocks held outside the block table
        side = blocks.num_side_blocks_of(seq)
        assert side == -(-compressor.demoted_nbytes // engine.kv_cache.block_nbytes) >= 1
        assert engine.stats()["kv_blocks_side_store"] == side
        assert seq.num_cached_slots < 8 + bs and blocks.num_used_blocks == len(seq.block_table) + side
        assert len(seq.block_table) <= blocks.blocks_for(8 + bs)
        d = config.head_dim
        per_token = config.num_layers * config.num_kv_heads * (2 * d * 2 // 8 + 4)  # codes + value scale/zero
        key_params = config.num_layers * config.num_kv_heads * d * 4 * state.demoted.num_groups
        assert compressor.demoted_nbytes == held * (per_token + 4) + key_params
        checked += 1
    assert checked > 3
    assert compressor.demoted_nbytes == 0 and blocks.num_free_blocks == blocks.num_blocks
    assert blocks.num_side_blocks == 0 and compressor.stats.demoted_dropped == 0


def test_side_blocks_are_held_outside_the_block_table(tiny_llama_gguf):
    blocks = LLM(str(tiny_llama_gguf), kv_cache_tokens=32, block_size=4).engine.block_manager  # 8 blocks
    seq = Sequence("s", 0, [1, 2, 3], SamplingParams())
    blocks.claim_cached_prefix(seq)
    blocks.append_slots(seq, 3)
    assert blocks.hold_side_blocks(seq, 3) and blocks.num_side_blocks_of(seq) == 3 and blocks.num_free_blocks == 4
    assert not blocks.hold_side_blocks(seq, 8) and blocks.num_side_blocks_of(seq) == 3  # short: nothing changes
    assert blocks.hold_side_blocks(seq, 1) and blocks.num_free_blocks == 6
    assert len(seq.block_table) == 1 and blocks.num_used_blocks == 2  # one table block, one side block
    blocks.free(seq)
    assert blocks.num_side_blocks == 0 and blocks.num_free_blocks == blocks.num_blocks


def test_side_store_sheds_its_oldest_groups():
    torch.manual_seed(3)
    store = LowPrecisionTokens(num_layers=2, bits=2, group_size=4)
    for count in (6, 3):  # groups of 4, 2 and 3 tokens
        store.append([torch.randn(2, count, 8) for _ in range(2)], [torch.randn(2, count, 8) for _ in range(2)])
    before = [store.layer(layer, torch.float32) for layer in range(2)]
    assert store.drop_oldest(store.nbytes) == 0
    nbytes = store.nbytes
    assert store.drop_oldest(nbytes - 1) == 4  # the first group (4 tokens) is enough
    assert store.num_tokens == 5 and store.num_groups == 2 and store.nbytes < nbytes
    fresh = LowPrecisionTokens(num_layers=2, bits=2, group_size=4)  # what 2 + 3 tokens cost
    fresh.append([torch.randn(2, 2, 8)] * 2, [torch.randn(2, 2, 8)] * 2)
    fresh.append([torch.randn(2, 3, 8)] * 2, [torch.randn(2, 3, 8)] * 2)
    assert store.nbytes == fresh.nbytes
    for layer, (k, v) in enumerate(before):  # the newest tokens are untouched
        low_k, low_v = store.layer(layer, torch.float32)
        assert torch.equal(low_k, k[:, 4:]) and torch.equal(low_v, v[:, 4:])
    assert store.drop_oldest(store.nbytes - 1) == 2 and store.num_tokens == 3
    assert store.drop_oldest(0) == 3 and store.num_tokens == 0 and store.nbytes == 0


def test_a_pool_too_small_for_the_side_stores_is_never_exceeded(tiny_llama_gguf):
    """Four mikv sequences whose side stores (4 bits, one key group per token) would outgrow a 128-token pool:
    at every step each store is covered by the blocks its sequence holds, table and side blocks together
    stay within the pool, the oldest demoted tokens are dropped to fit, and every sequence completes."""
    small = LLM(str(tiny_llama_gguf), kv_cache_tokens=128, block_size=4, enable_prefix_caching=False)
    engine = small.engine
    compressor, blocks, block_nbytes = engine.kv_compressor, engine.block_manager, engine.kv_cache.block_nbytes
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, kv_policy="mikv", kv_budget=4,
                            kv_policy_options={"bits": 4, "group_size": 1})
    for i in range(4):
        engine.add_request(str(i), [(7 * i + 3 * t) % 250 + 1 for t in range(24)], params)
    seqs = [engine.requests[str(i)].seqs[0] for i in range(4)]
    done, peak = {}, 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = len(out.outputs[0].token_ids)
        for seq in seqs:
            state = compressor._states.get(seq)
            store = None if state is None or seq.is_finished else state.demoted
            assert blocks.num_side_blocks_of(seq) * block_nbytes >= (0 if store is None else store.nbytes)
        assert sum(len(s.block_table) for s in seqs) + blocks.num_side_blocks == blocks.num_used_blocks
        peak = max(peak, blocks.num_side_blocks)
    assert done == {str(i): 40 for i in range(4)}
    assert compressor.stats.demoted_dropped > 0 and peak > 0
    assert blocks.num_side_blocks == 0 and blocks.num_free_blocks == blocks.num_blocks


def test_a_lone_sequence_sheds_demoted_tokens_rather_than_preempting_itself(tiny_llama_gguf):
    """A pool just large enough for one sequence: its side store takes only what the sequence does not need
    before its next compaction, so it is never preempted; what does not fit is dropped, oldest first."""
    small = LLM(str(tiny_llama_gguf), kv_cache_tokens=64, block_size=4, kv_cache_dtype="int8")
    engine = small.engine
    out = small.generate(list(range(1, 25)), SamplingParams(temperature=0, max_tokens=40, ignore_eos=True,
                                                             kv_policy="mikv", kv_budget=4,
                                                             kv_policy_options={"bits": 4, "group_size": 1}))
    assert len(out[0].outputs[0].token_ids) == 40 and engine.scheduler.num_preemptions == 0
    assert engine.kv_compressor.stats.demoted_dropped > 0
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_preemption_drops_the_side_store_and_recomputes(tiny_llama_gguf):
    """A decoding mikv sequence holding demoted tokens is preempted by a higher-priority one: its side
    store goes at once, and it is recomputed (and compressed, and demotes, again) to the end."""
    small = LLM(str(tiny_llama_gguf), kv_cache_tokens=96, block_size=4, max_num_batched_tokens=16,
                scheduling_policy="priority")
    engine = small.engine
    compressor, scheduler = engine.kv_compressor, engine.scheduler
    engine.add_request("low", PROMPT[:100], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True,
                                                           kv_policy="mikv", kv_budget=16, priority=1))
    seq = engine.requests["low"].seqs[0]
    while compressor._states[seq].demoted is None or seq.num_computed_tokens < seq.prompt_len + 4:
        engine.step()
    engine.add_request("high", "0 " + PROMPT[:100], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True,
                                                                   priority=0))
    while not seq.num_preemptions:
        engine.step()
    assert compressor._states[seq].demoted is None and compressor.demoted_nbytes == 0
    assert engine.block_manager.num_side_blocks == 0  # its side blocks went with its other blocks
    demoted_before = compressor.stats.demoted_slots
    while engine.has_unfinished_requests():
        outputs = engine.step()
        for out in outputs:
            if out.request_id == "low" and out.finished:
                assert len(out.outputs[0].token_ids) == 30
    # >= 1: with the side store's blocks counted, this pool is tight enough to preempt it again mid-recomputation
    assert scheduler.num_preemptions >= 1 and compressor.stats.demoted_slots > demoted_before
    assert compressor.demoted_nbytes == 0
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_chunked_prefill_demotes_once_the_whole_prompt_is_in(tiny_llama_gguf):
    chunked = LLM(str(tiny_llama_gguf), kv_cache_tokens=4096, block_size=4, max_num_batched_tokens=8)
    compressor, first = chunked.engine.kv_compressor, []
    original = compressor._demote

    def recording(seq, state, keys, values):
        first.append((seq.num_computed_tokens, seq.prompt_len, keys[0].shape[1]))
        original(seq, state, keys, values)

    compressor._demote = recording
    chunked.generate(PROMPT, greedy(kv_policy="mikv", kv_budget=10))
    computed, prompt_len, count = first[0]
    assert prompt_len > 8 and computed == prompt_len and count == prompt_len - 10


def test_speculative_tokens_never_reach_the_side_store(tiny_llama_gguf):
    """Compactions (and so demotions) run after drafts are settled: every slot of the sequence then holds
    an accepted token, so the slots demoted are real ones; the counts add up at every demotion."""
    llm = LLM(str(tiny_llama_gguf), kv_cache_tokens=4096, block_size=4, speculative_adaptive=False)
    engine, compressor = llm.engine, llm.engine.kv_compressor
    original, checked = compressor._demote, []

    def recording(seq, state, keys, values):
        held = 0 if state.demoted is None else state.demoted.num_tokens
        # every slot holds a computed token (no draft slot left), and each token is in a slot or demoted
        assert seq.num_cached_slots + held == seq.num_computed_tokens
        checked.append(keys[0].shape[1])
        original(seq, state, keys, values)

    compressor._demote = recording
    prompt = "the cat sat on the mat, the cat sat on the mat, the cat sat on the" * 2
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, speculative="ngram",
                                              kv_policy="mikv", kv_budget=12))[0].outputs[0]
    assert len(out.token_ids) == 24 and len(checked) > 1
    assert engine.stats()["spec_ngram_drafts"] > 0
    assert compressor.demoted_nbytes == 0 and engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_shared_prefix_is_never_written(llm):
    baseline = tokens(llm, greedy())
    outs = llm.generate([PROMPT, PROMPT, PROMPT], [greedy(), greedy(kv_policy="mikv", kv_budget=8), greedy()])
    assert outs[0].outputs[0].token_ids == baseline and outs[2].outputs[0].token_ids == baseline
    assert tokens(llm, greedy()) == baseline


def test_bad_options_are_refused(llm, tiny_gemma3_gguf):
    with pytest.raises(InvalidRequestError, match="bits must be 2 or 4"):
        greedy(kv_policy="mikv", kv_budget=8, kv_policy_options={"bits": 3})
    with pytest.raises(InvalidRequestError, match="importance 'd2o' is not supported"):
        make_policy("mikv", {"importance": "d2o"})
    with pytest.raises(InvalidRequestError, match="importance 'mikv'"):
        make_policy("mikv", {"importance": "mikv"})
    with pytest.raises(InvalidRequestError, match="group_size"):
        make_policy("mikv", {"group_size": 0})
    gemma = LLM(str(tiny_gemma3_gguf), kv_cache_tokens=512, block_size=4)
    with pytest.raises(InvalidRequestError, match="sliding-window"):
        gemma.generate(PROMPT, greedy(kv_policy="mikv", kv_budget=8))


def test_server_takes_mikv_options_and_refuses_bad_ones():
    from tests.test_server_kv_options import RecordingEngine, post
    from tests.test_server_plumbing import completion

    engine = RecordingEngine()
    options = {"bits": 4, "importance": "knorm", "group_size": 16}
    response = post(engine, completion(kv_policy="mikv", kv_budget=0.25, kv_policy_options=options))
    assert response.status_code == 200, response.text
    assert engine.seen[0].kv_policy == "mikv" and engine.seen[0].kv_policy_options == options
    for bad, message in (({"bits": 3}, "bits must be 2 or 4"), ({"bits": 8}, "must be in [2, 4]"),
                         ({"importance": "d2o"}, "not supported"), ({"group_size": 0}, "must be in [1")):
        response = post(engine, completion(kv_policy="mikv", kv_budget=0.25, kv_policy_options=bad))
        assert response.status_code == 400 and message in response.json()["error"]["message"], response.text
    assert len(engine.seen) == 1

"""Quantized KV caches (thrifty.kv.quant): error bounds, KIVI's grouping, the residual store,
pool sizing, and the engine with kv_cache_dtype=int8 / kivi4 under every feature that moves KV."""

from types import SimpleNamespace

import pytest
import torch

from tests.fixtures.tiny_models import make_tiny_llm
from thrifty.config import ModelConfig
from thrifty.engine.engine import EngineConfig
from thrifty.engine.sampling_params import SamplingParams
from thrifty.errors import InvalidRequestError
from thrifty.kv.cache import KVCache, block_bytes, pool_blocks
from thrifty.kv.quant import Int8KV, KiviKV, ResidualBlocks
from thrifty.kv.quant.int8 import dequantize_int8, quantize_int8
from thrifty.kv.quant.kivi import pack4, quantize_asym4, unpack4
from thrifty.models.paged_attention import AttentionMetadata, SequenceSlice

QUANT = ["int8", "kivi4"]
PROMPTS = ["the cat sat on the mat", "hello world, this is a longer prompt that needs more than one block",
           "a", "one two three four five six seven eight nine ten eleven twelve thirteen"]
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def smollm_like(num_layers: int = 30) -> ModelConfig:
    return ModelConfig(architecture="llama", vocab_size=100, hidden_size=576, intermediate_size=1536,
                       num_layers=num_layers, num_heads=9, num_kv_heads=3, head_dim=64, max_position_embeddings=8192)


# -- the quantizers on hand-made tensors ------------------------------------------------------

def test_int8_error_is_at_most_half_a_step_per_token_and_head():
    torch.manual_seed(0)
    x = torch.randn(7, 3, 64) * torch.tensor([0.01, 1.0, 300.0])[None, :, None]
    x[0, 0] = 0.0  # an all-zero row must not divide by zero
    x[1, 1, 5] = 40.0  # an outlier only coarsens its own row
    q, scale = quantize_int8(x)
    assert q.dtype == torch.int8 and scale.shape == (7, 3) and scale.dtype == torch.float16
    assert int(q.abs().max()) <= 127
    err = (dequantize_int8(q, scale) - x).abs()
    assert torch.all(err <= scale.float()[..., None] / 2 + x.abs().amax(-1, keepdim=True) * 2 ** -11 + 1e-6)
    q2, scale2 = quantize_int8(dequantize_int8(q, scale))  # idempotent: moving a token costs nothing
    assert torch.equal(q2, q) and torch.equal(scale2, scale)
    assert torch.allclose(scale.float(), (x.abs().amax(-1) / 127).clamp(min=2 ** -14), rtol=2e-3)
    assert float(err[0, 0].max()) == 0.0
    others = torch.ones(7, 3, dtype=torch.bool)
    others[1, 1] = False
    assert float(err[1, 1].max()) > float(err[:, 1][others[:, 1]].max())


def test_asym4_error_bound_and_packing():
    torch.manual_seed(1)
    x = torch.randn(5, 16, 8) * 3 + 7  # offset values: asymmetric quantization uses the whole range
    codes, scale, zero = quantize_asym4(x, dim=1)
    assert codes.max() <= 15 and scale.shape == (5, 1, 8)
    deq = codes.float() * scale.float() + zero.float()
    spread = x.amax(1, keepdim=True) - x.amin(1, keepdim=True)
    assert torch.all((deq - x).abs() <= scale.float() / 2 + (zero.float().abs() + spread) * 2 ** -11 + 1e-5)
    assert all(torch.equal(a, b) for a, b in zip(quantize_asym4(deq, dim=1), (codes, scale, zero)))
    assert torch.allclose(zero.float(), x.amin(1, keepdim=True), rtol=2e-3)
    assert torch.allclose(scale.float(), (x.amax(1, keepdim=True) - x.amin(1, keepdim=True)) / 15, rtol=3e-3)
    packed = pack4(codes)
    assert packed.shape == (5, 16, 4) and packed.dtype == torch.uint8
    assert torch.equal(unpack4(packed), codes)
    assert int(packed[0, 0, 0]) == int(codes[0, 0, 0]) | (int(codes[0, 0, 1]) << 4)


def kivi_store(num_blocks=4, block_size=4, heads=2, dim=8, capacity=2):
    residual = ResidualBlocks(num_blocks, block_size, capacity, torch.device("cpu"))
    return KiviKV(num_blocks, block_size, heads, dim, torch.float32, torch.device("cpu"), residual), residual


def reference_asym4(group: torch.Tensor) -> torch.Tensor:
    """One group quantized to 4 bits the direct way: zero = min, step = (max - min) / 15 (float16 params)."""
    lo = group.min().half().float()
    step = ((group.max() - lo) / 15).half().float()
    return torch.round((group - lo) / step).clamp(0, 15) * step + lo


def test_kivi_groups_keys_per_channel_over_a_block_and_values_per_token():
    torch.manual_seed(2)
    bs, heads, dim = 4, 2, 8
    store, _ = kivi_store(block_size=bs, heads=heads, dim=dim)
    k = torch.randn(bs, heads, dim)
    v = torch.randn(bs, heads, dim)
    k[:, 0, 3] += 50.0  # an outlier channel (KIVI's motivation for per-channel keys)
    v[2, 1] *= 40.0  # an outlier token (per-token values)
    slots = torch.arange(bs, 2 * bs)  # block 1, written whole: quantized at once
    store.write(slots, k, v)
    gk, gv = store.gather(slots)

    # Direct reference: keys, for each (head, channel), min/max over the block's 4 tokens.
    ref_k = torch.empty_like(k)
    for h in range(heads):
        for c in range(dim):
            col = k[:, h, c]
            ref_k[:, h, c] = reference_asym4(col)
    # Values, for each (token, head), min/max over the head's channels.
    ref_v = torch.empty_like(v)
    for t in range(bs):
        for h in range(heads):
            row = v[t, h]
            ref_v[t, h] = reference_asym4(row)
    assert torch.allclose(gk, ref_k, atol=1e-5)
    assert torch.allclose(gv, ref_v, atol=1e-5)
    assert torch.allclose(store.k_scale[1].float(), (k.amax(0) - k.amin(0)) / 15, rtol=0.05)
    assert torch.allclose(store.v_scale[slots].float(), (v.amax(-1) - v.amin(-1)) / 15, rtol=0.05)
    # The offset channel costs per-channel keys nothing, where per-token groups would lose every channel;
    # the outlier token coarsens only its own value group.
    k_err, v_err = (gk - k).abs(), (gv - v).abs()
    codes, scale, zero = quantize_asym4(k, dim=-1)
    per_token_err = (codes.float() * scale.float() + zero.float() - k).abs()
    assert float(k_err[:, 0].max()) < 0.2
    assert float(per_token_err[:, 0].max()) > 1.0
    assert float(v_err[2, 1].max()) > 4 * float(v_err[[0, 1, 3], 1].max())


def test_kivi_partial_blocks_stay_exact_until_sealed_and_freed_blocks_return_their_residual():
    torch.manual_seed(3)
    store, residual = kivi_store(block_size=4, capacity=1)
    k, v = torch.randn(6, 2, 8), torch.randn(6, 2, 8)
    for t in range(6):  # decode, one token at a time into blocks 2 and 3
        store.write(torch.tensor([8 + t]), k[t:t + 1], v[t:t + 1])
    assert set(residual.rid) == {2, 3} and residual.grown == 1  # a second partial block: the store grew
    gk, gv = store.gather(torch.arange(8, 14))
    assert torch.equal(gk, k) and torch.equal(gv, v)  # full precision while not sealed
    seq = SimpleNamespace(block_table=[2, 3], num_cached_slots=6)
    blocks = SimpleNamespace(ref_counts=[0, 0, 1, 1], block_hash=[None] * 4)
    cache = SimpleNamespace(block_size=4, residual=residual)
    KVCache.sync(cache, blocks, [seq])
    assert set(residual.rid) == {3}  # block 2 is full: quantized, its residual slot given back
    gk, gv = store.gather(torch.arange(8, 14))
    assert torch.equal(gk[4:], k[4:]) and not torch.equal(gk[:4], k[:4])
    assert torch.allclose(gk, k, atol=0.5) and torch.allclose(gv, v, atol=0.5)
    blocks.ref_counts[3] = 0  # the sequence finished: its partial block is dropped
    KVCache.sync(cache, blocks, [])
    assert residual.rid == {} and int(residual.rid_of_block.max()) == -1
    # A write into a quantized block (a compaction, a reused block) moves it back to full precision.
    before, _ = store.gather(torch.arange(8, 12))
    store.write(torch.tensor([11]), k[:1], v[:1])
    after, _ = store.gather(torch.arange(8, 12))
    assert set(residual.rid) == {2}
    assert torch.equal(after[:3], before[:3]) and torch.equal(after[3], k[0])


def test_copy_slots_moves_quantized_and_residual_slots():
    torch.manual_seed(4)
    int8 = Int8KV(16, 2, 8, torch.float32, torch.device("cpu"))
    k, v = torch.randn(4, 2, 8), torch.randn(4, 2, 8)
    int8.write(torch.arange(4), k, v)
    int8.copy_slots(torch.tensor([1, 3]), torch.tensor([8, 9]))
    assert torch.equal(int8.gather(torch.tensor([8, 9]))[0], int8.gather(torch.tensor([1, 3]))[0])
    store, _ = kivi_store()
    store.write(torch.arange(4, 7), k[:3], v[:3])  # partial block 1: residual
    store.copy_slots(torch.tensor([6]), torch.tensor([5]))
    gk, gv = store.gather(torch.arange(4, 6))
    assert torch.equal(gk[1], k[2]) and torch.equal(gv[1], v[2])


# -- sizes ------------------------------------------------------------------------------------

def test_a_byte_budget_holds_about_four_times_the_tokens_in_int8():
    config = smollm_like()
    budget = 512 * 2 ** 20
    fp32 = pool_blocks(config, torch.float32, 16, None, budget, 0)
    int8 = pool_blocks(config, torch.float32, 16, None, budget, 0, kv_cache_dtype="int8")
    kivi = pool_blocks(config, torch.float32, 16, None, budget, 0, kv_cache_dtype="kivi4", max_num_seqs=8)
    assert 3.8 < int8 / fp32 <= 4.0  # 66 bytes per token and head instead of 256
    assert kivi / fp32 > 5.5  # 4-bit codes + per-token value and per-block key scales, less the residual
    assert block_bytes(config, torch.float32, 16, "int8") == 30 * 3 * 2 * (64 + 2) * 16
    cache = KVCache(smollm_like(2), 8, 16, torch.float32, torch.device("cpu"), "kivi4", max_num_seqs=2)
    assert cache.bytes_per_token == block_bytes(smollm_like(2), torch.float32, 16, "kivi4") / 16
    assert cache.nbytes == cache.bytes_per_token * 8 * 16 + cache.residual_nbytes


def test_unknown_kv_cache_dtype_is_refused(tiny_llama_gguf):
    with pytest.raises(InvalidRequestError, match="kv_cache_dtype 'fp4' is unknown"):
        EngineConfig(kv_cache_dtype="fp4").validate()
    with pytest.raises(InvalidRequestError, match="kv_cache_dtype"):
        make_tiny_llm(tiny_llama_gguf, kv_cache_dtype="int4")


def test_engine_pool_in_bytes_holds_more_tokens(tiny_llama_gguf):
    fp = make_tiny_llm(tiny_llama_gguf, kv_cache_tokens=None, kv_cache_bytes=2 ** 20)
    q = make_tiny_llm(tiny_llama_gguf, kv_cache_tokens=None, kv_cache_bytes=2 ** 20, kv_cache_dtype="int8")
    ratio = q.engine.block_manager.num_blocks / fp.engine.block_manager.num_blocks
    assert 3.4 < ratio <= 4.0  # head_dim 16: 18 bytes instead of 64 per token and head
    assert q.engine.kv_cache.nbytes <= 2 ** 20


# -- the engine -------------------------------------------------------------------------------

def chunked_logits(llm, ids: list[int], chunk: int) -> torch.Tensor:
    """Logits of every position, feeding the sequence `chunk` tokens at a time through one slot range,
    sealing full KIVI blocks after each step as the engine does."""
    engine = llm.engine
    model, n, bs = engine.model, len(ids), engine.kv_cache.block_size
    out = []
    with torch.inference_mode():
        for start in range(0, n, chunk):
            end = min(n, start + chunk)
            meta = AttentionMetadata(slot_mapping=torch.arange(start, end),
                                     sequences=[SequenceSlice(0, end - start, end, torch.arange(end))])
            out.append(model.compute_logits(model(torch.tensor(ids[start:end]), torch.arange(start, end), meta)))
            seq = SimpleNamespace(block_table=list(range(-(-end // bs))), num_cached_slots=end)
            blocks = SimpleNamespace(ref_counts=[1] * engine.kv_cache.num_blocks,
                                     block_hash=[None] * engine.kv_cache.num_blocks)
            engine.kv_cache.sync(blocks, [seq])
    return torch.cat(out)


@pytest.mark.parametrize("dtype", QUANT)
def test_logits_stay_close_to_the_full_precision_cache(tiny_llama_gguf, dtype):
    torch.manual_seed(5)
    ids = torch.randint(0, 300, (96,)).tolist()
    ref = chunked_logits(make_tiny_llm(tiny_llama_gguf, block_size=16), ids, 8)
    got = chunked_logits(make_tiny_llm(tiny_llama_gguf, block_size=16, kv_cache_dtype=dtype), ids, 8)
    rel = float((got - ref).abs().max() / ref.abs().max())
    assert rel < {"int8": 0.02, "kivi4": 0.15}[dtype], rel
    assert rel > 0  # the cache really is quantized
    agree = float((got.argmax(-1) == ref.argmax(-1)).float().mean())
    assert agree > {"int8": 0.95, "kivi4": 0.8}[dtype], agree


@pytest.mark.parametrize("dtype", QUANT)
def test_batched_equals_alone_and_every_kv_feature_runs(tiny_llama_gguf, dtype):
    # Without the prefix cache: a cached (quantized) prompt block would be seen where a fresh prefill
    # sees its own tokens as computed, so kivi4's output may differ from the first run with it.
    llm = make_tiny_llm(tiny_llama_gguf, kv_cache_dtype=dtype, enable_prefix_caching=False)
    alone = [llm.generate(p, GREEDY)[0].outputs[0].token_ids for p in PROMPTS]
    assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)] == alone
    residual = llm.engine.kv_cache.residual
    assert residual is None or residual.rid == {}  # every residual block came back
    llm = make_tiny_llm(tiny_llama_gguf, kv_cache_dtype=dtype)
    residual = llm.engine.kv_cache.residual
    # speculative decoding (tree drafts roll back and move slots) and prefix sharing (n=2)
    spec = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, speculative="ngram")
    outs = llm.generate([p + " " + p for p in PROMPTS], spec)
    assert all(len(o.outputs[0].token_ids) == 24 for o in outs)
    outs = llm.generate(PROMPTS[1], SamplingParams(temperature=0.8, max_tokens=8, n=2, seed=1, ignore_eos=True))
    assert len(outs[0].outputs) == 2
    # eviction (compaction reads, moves and rewrites slots), mixed with uncompressed sequences
    evict = [SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, kv_policy=p, kv_budget=8)
             for p in ("h2o", "streaming_llm", "snapkv")] + [GREEDY]
    outs = llm.generate(PROMPTS, evict)
    assert [len(o.outputs[0].token_ids) for o in outs] == [20, 20, 20, 12]
    assert llm.engine.kv_compressor.stats.compactions > 0
    assert residual is None or residual.rid == {}


@pytest.mark.parametrize("dtype", QUANT)
def test_chunked_prefill_and_preemption_run(tiny_llama_gguf, dtype):
    small = make_tiny_llm(tiny_llama_gguf, kv_cache_dtype=dtype, kv_cache_tokens=112, max_num_batched_tokens=8)
    long = PROMPTS + PROMPTS
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    outs = small.generate(long, params)
    assert all(len(o.outputs[0].token_ids) == 16 for o in outs)
    assert small.engine.scheduler.num_preemptions > 0
    assert small.engine.block_manager.num_free_blocks == small.engine.block_manager.num_blocks
    spec = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, speculative="ngram")
    assert all(len(o.outputs[0].token_ids) == 16 for o in small.generate(long, spec))
    residual = small.engine.kv_cache.residual
    assert residual is None or residual.rid == {}


@pytest.mark.parametrize("dtype", QUANT)
def test_sliding_window_and_softcap_model_runs_batched(tiny_gemma3_gguf, dtype):
    llm = make_tiny_llm(tiny_gemma3_gguf, kv_cache_dtype=dtype)
    alone = [llm.generate(p, GREEDY)[0].outputs[0].token_ids for p in PROMPTS[:2]]
    assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS[:2], GREEDY)] == alone


@pytest.mark.parametrize("dtype", QUANT)
def test_compaction_moves_each_heads_kept_tokens_through_a_quantized_cache(tiny_llama_gguf, dtype):
    from thrifty.engine.sequence import Sequence

    engine = make_tiny_llm(tiny_llama_gguf, kv_cache_tokens=256, kv_cache_dtype=dtype).engine
    compressor, cache, blocks = engine.kv_compressor, engine.kv_cache, engine.block_manager
    seq = Sequence("x", 0, list(range(1, 15)), SamplingParams(max_tokens=None, kv_policy="knorm", kv_budget=6))
    compressor.add(seq)
    blocks.claim_cached_prefix(seq)
    slot_ids = torch.tensor(blocks.append_slots(seq, 14))
    seq.num_computed_tokens = 14
    torch.manual_seed(6)
    for store in cache.stores:
        store.write(slot_ids, torch.randn(14, 2, 16), torch.randn(14, 2, 16))
    cache.sync(blocks, [seq])  # kivi4: three full blocks sealed, the partial fourth stays exact
    before = [store.gather(slot_ids) for store in cache.stores]
    state = compressor._states[seq]
    keep = compressor.select(seq, state, 6)
    compressor.compress(seq, state)
    assert seq.num_cached_slots == 6 and len(seq.block_table) == 2
    front = compressor._slot_ids(seq)
    for store, (k0, v0), idx in zip(cache.stores, before, keep):
        k, v = store.gather(front)
        for h in range(2):  # close: a kept token may be quantized again in its new block
            assert torch.allclose(k[:, h], k0[idx[h], h], atol=0.6) and torch.allclose(v[:, h], v0[idx[h], h], atol=0.6)
            if dtype == "int8":  # per-token groups: moving a token requantizes it exactly
                assert torch.allclose(k[:, h], k0[idx[h], h], atol=1e-6)
    blocks.free(seq)
    cache.sync(blocks, [])
    assert cache.residual is None or cache.residual.rid == {}

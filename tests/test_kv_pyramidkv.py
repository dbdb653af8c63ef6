"""PyramidKV (thrifty.kv.policies.pyramidkv): its layer budgets against the reference formula, and its
selection against SnapKV's, on small hand-made tensors and through the engine on the tiny model."""

from __future__ import annotations

import itertools

import pytest
import torch

from thrifty.api import LLM
from thrifty.engine.sampling_params import SamplingParams
from thrifty.kv.compression import keep_indices
from thrifty.kv.policies import ScoreInputs
from thrifty.kv.policies.pyramidkv import PyramidKVPolicy
from thrifty.kv.policies.snapkv import SnapKVPolicy


def reference_budgets(budget: int, q_len: int, layers: int, window: int, beta: float) -> list[float]:
    """KVCache-Factory's PyramidKVCluster.update_kv (pyramidkv_utils.py), without its integer divisions:
    each layer keeps `max_num - layer * steps` besides the window, plus the window."""
    min_num = (budget - window) / beta
    max_num = (budget - window) * 2 - min_num
    if max_num >= q_len - window:
        max_num = q_len - window
        min_num = (budget - window) * 2 - max_num
    steps = (max_num - min_num) / (layers - 1)
    return [window + max_num - layer * steps for layer in range(layers)]


def scores(policy: SnapKVPolicy, stat: torch.Tensor) -> torch.Tensor:
    heads, n = stat.shape[0], stat.shape[-1]
    return policy.score(ScoreInputs(0, 1, torch.zeros(heads, n, 4), torch.zeros(heads, n, 4), stat,
                                    torch.arange(n).expand(heads, n)))


@pytest.mark.parametrize("budget,q_len", [(541, 1082), (271, 1082), (1565, 3130), (100, 1082), (1000, 1082)])
def test_budgets_follow_the_reference_formula(budget, q_len):
    # SmolLM2-135M's 30 layers with the passkey bench's prompt lengths (1082 and 3130 tokens at "1024"
    # and "3072") and budgets 1/2, 1/4; 1000 of 1082 caps the first layer at the whole prompt.
    layers, window, beta = 30, 32, 20.0
    ours = PyramidKVPolicy(window_size=window, beta=beta).layer_budgets(budget, q_len, [None] * layers)
    expected = reference_budgets(budget, q_len, layers, window, beta)
    assert ours == [round(b) for b in expected]
    assert ours == sorted(ours, reverse=True) and ours[0] <= q_len
    assert abs(sum(ours) - budget * layers) <= layers // 2  # the total is the uniform budget's, up to rounding
    steps = [a - b for a, b in itertools.pairwise(ours)]
    assert max(steps) - min(steps) <= 1  # arithmetic, up to rounding


def test_the_bench_prompt_budgets_at_one_half():
    # What the 1024-token passkey prompt (1082 tokens) gets at budget 1/2 (541): 1025 slots in the first
    # layer down to 57 in the last, 32 of them the window in every layer.
    ours = PyramidKVPolicy().layer_budgets(541, 1082, [None] * 30)
    assert ours[0] == 1025 and ours[-1] == 57 and ours[15] == 524 and sum(ours) == 541 * 30


def test_a_flat_schedule_is_snapkv():
    # beta = 1: the last layer's share equals the mean's, so every layer keeps the request's budget.
    assert PyramidKVPolicy(beta=1).layer_budgets(541, 1082, [None] * 30) == [541] * 30


def test_selection_equals_snapkv_on_hand_made_votes():
    # 2 KV heads, 12 slots, window of 3 queries/slots, pooling kernel 3.
    stat = torch.zeros(2, 3, 12)
    stat[0, :, 2] = 0.5  # head 0 votes for slot 2 (and, pooled, its neighbours 1 and 3)
    stat[0, :, 6] = 0.2
    stat[1, :, 7] = 0.6  # head 1 for slot 7 (6 and 8 pooled); 8 is also the last slot pooled
    stat[1, 0, 4] = 0.1
    stat[:, :, 9:] = 0.3  # the window's own columns
    snap = SnapKVPolicy(window_size=3, kernel_size=3)
    pyramid = PyramidKVPolicy(window_size=3, kernel_size=3, beta=1)
    assert torch.equal(scores(pyramid, stat), scores(snap, stat))
    for budget in (4, 6, 8):
        ours = keep_indices(scores(pyramid, stat), budget, pyramid.window(budget))
        theirs = keep_indices(scores(snap, stat), budget, snap.window(budget))
        assert torch.equal(ours, theirs)
    kept = keep_indices(scores(pyramid, stat), 6, pyramid.window(6)).tolist()
    assert kept == [[1, 2, 3, 9, 10, 11], [6, 7, 8, 9, 10, 11]]


def test_each_layer_keeps_snapkvs_top_at_its_own_size():
    # Same votes, per-layer sizes: a layer's kept set is SnapKV's top-k at the layer's size, so a larger
    # budget keeps a superset and a smaller one a subset of what SnapKV's uniform budget keeps.
    torch.manual_seed(0)
    stat = torch.softmax(torch.randn(3, 4, 40), dim=-1)
    pyramid = PyramidKVPolicy(window_size=4, kernel_size=5, beta=4)
    snap = SnapKVPolicy(window_size=4, kernel_size=5)
    sizes = pyramid.layer_budgets(16, 40, [None] * 5)
    for size in sizes:
        kept = keep_indices(scores(pyramid, stat), size, pyramid.window(size))
        base = keep_indices(scores(snap, stat), 16, 4)
        for mine, theirs in zip(kept.tolist(), base.tolist()):
            assert (set(mine) >= set(theirs)) if size >= 16 else (set(mine) <= set(theirs))


GREEDY = {"temperature": 0, "max_tokens": 12, "ignore_eos": True}
PROMPT = ("hello world, this is a longer prompt that needs more than one block of the cache "
          "and then some more words so that eviction has something to choose from")


@pytest.fixture(scope="module")
def llm(tiny_llama_gguf):
    return LLM(str(tiny_llama_gguf), kv_cache_tokens=4096, block_size=4, enable_prefix_caching=False)


def kept_after_prefill(llm, **kv) -> tuple[list[torch.Tensor], list[int], tuple[int, ...]]:
    """Each layer's kept token positions after the prompt's compaction, its sizes, and the tokens generated."""
    engine = llm.engine
    engine.add_request("r", PROMPT, SamplingParams(**GREEDY, **kv))
    seq = engine.requests["r"].seqs[0]
    while seq.in_prefill:
        engine.step()
    state = engine.kv_compressor._states[seq]
    sizes = list(state.layer_budgets)
    kept = [p[:, :size].sort(dim=1).values.clone() for p, size in zip(state.positions, sizes)]
    while engine.has_unfinished_requests():
        engine.step()
    return kept, sizes, tuple(seq.output_token_ids)


def test_flat_pyramid_selects_and_generates_exactly_like_snapkv(llm):
    snap = {"kv_policy": "snapkv", "kv_budget": 16, "kv_policy_options": {"window_size": 4}}
    flat = {"kv_policy": "pyramidkv", "kv_budget": 16, "kv_policy_options": {"window_size": 4, "beta": 1}}
    snap_kept, snap_sizes, snap_out = kept_after_prefill(llm, **snap)
    flat_kept, flat_sizes, flat_out = kept_after_prefill(llm, **flat)
    assert flat_sizes == snap_sizes == [16] * len(snap_sizes)
    for a, b in zip(snap_kept, flat_kept):
        assert torch.equal(a, b)
    assert flat_out == snap_out


def test_pyramid_layers_keep_supersets_or_subsets_of_snapkv(llm):
    snap_kept, _, _ = kept_after_prefill(llm, kv_policy="snapkv", kv_budget=16, kv_policy_options={"window_size": 4})
    kept, sizes, _ = kept_after_prefill(llm, kv_policy="pyramidkv", kv_budget=16,
                                        kv_policy_options={"window_size": 4})
    assert sizes[0] > 16 > sizes[-1]
    for mine, theirs, size in zip(kept, snap_kept, sizes):
        for a, b in zip(mine.tolist(), theirs.tolist()):
            assert (set(a) >= set(b)) if size >= 16 else (set(a) <= set(b))


def test_decode_attention_sees_only_each_layers_own_slots(llm, monkeypatch):
    # The attention observer gets every decode step's probabilities: a layer puts none of its weight on
    # the slots between its own budget and the shared slot count.
    from thrifty.kv import compression

    seen = []
    original = compression.KVCompressor._observe

    def observe(self, state, layer, probs):
        lengths = state.lengths
        if lengths is not None and probs.shape[1] == 1:
            seen.append(float(probs[..., lengths.kept[layer]:lengths.shared].sum()))
        original(self, state, layer, probs)

    monkeypatch.setattr(compression.KVCompressor, "_observe", observe)
    kept_after_prefill(llm, kv_policy="pyramidkv", kv_budget=16, kv_policy_options={"window_size": 4})
    assert seen and max(seen) == 0.0

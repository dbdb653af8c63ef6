"""Each policy's selection on small hand-made tensors, against its paper's rule."""

import pytest
import torch

from thrifty.errors import InvalidRequestError
from thrifty.kv.compression import keep_indices
from thrifty.kv.policies import (
    H2OPolicy,
    KeyformerPolicy,
    KNormPolicy,
    ScoreInputs,
    SnapKVPolicy,
    StreamingLLMPolicy,
    TOVAPolicy,
    make_policy,
)


def inputs(n: int, heads: int = 2, keys: torch.Tensor | None = None, stat: torch.Tensor | None = None) -> ScoreInputs:
    keys = torch.randn(heads, n, 4) if keys is None else keys
    return ScoreInputs(layer=0, num_layers=1, keys=keys, values=torch.randn(heads, n, 4), stat=stat,
                       positions=torch.arange(n).expand(heads, -1))


def select(policy, inp: ScoreInputs, budget: int) -> list[list[int]]:
    return keep_indices(policy.score(inp), budget, min(policy.window(budget), budget)).tolist()


def test_streaming_llm_keeps_sinks_and_recent():
    kept = select(StreamingLLMPolicy(sinks=2), inputs(10), budget=6)
    assert kept == [[0, 1, 6, 7, 8, 9]] * 2


def test_knorm_keeps_lowest_norm_keys():
    norms = torch.tensor([[5.0, 1.0, 4.0, 2.0, 3.0], [1.0, 2.0, 3.0, 4.0, 5.0]])
    keys = torch.zeros(2, 5, 4)
    keys[..., 0] = norms
    assert select(KNormPolicy(), inputs(5, keys=keys), budget=2) == [[1, 3], [0, 1]]


def test_h2o_keeps_heavy_hitters_plus_recent_window():
    policy = H2OPolicy(recent_ratio=0.5)
    # Two steps of attention from 1 KV head: accumulated column sums decide.
    probs1 = torch.tensor([[[0.7, 0.1, 0.1, 0.1, 0.0, 0.0, 0.0, 0.0]]])
    probs2 = torch.tensor([[[0.1, 0.0, 0.6, 0.0, 0.1, 0.1, 0.0, 0.1]]])
    stat = policy.observe(policy.observe(None, probs1), probs2)
    assert torch.allclose(stat, probs1.sum(1) + probs2.sum(1))
    # budget 4: window of 2 (slots 6, 7), then the two heaviest of the rest: slot 0 (0.8), slot 2 (0.7).
    assert select(policy, inputs(8, heads=1, stat=stat), budget=4) == [[0, 2, 6, 7]]


def test_tova_uses_the_last_query_averaged_over_heads():
    policy = TOVAPolicy()
    probs = torch.zeros(2, 2, 5)  # 2 KV heads, 2 queries
    probs[0, 0] = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0])  # an older query: ignored
    probs[0, 1] = torch.tensor([0.5, 0.1, 0.2, 0.1, 0.1])
    probs[1, 1] = torch.tensor([0.1, 0.1, 0.6, 0.1, 0.1])
    stat = policy.observe(None, probs)
    assert torch.allclose(stat[0], torch.tensor([0.3, 0.1, 0.4, 0.1, 0.1]))
    assert select(policy, inputs(5, stat=stat), budget=2) == [[0, 2], [0, 2]]  # the same tokens in every head


def test_snapkv_window_votes_with_pooling_per_head():
    policy = SnapKVPolicy(window_size=2, kernel_size=3, pooling="max")
    n = 10
    probs = torch.zeros(2, 4, n)  # 4 queries; only the last 2 form the observation window
    probs[:, :2, 1] = 1.0  # outside the window: must not count
    probs[0, 2:, 3] = 0.8
    probs[1, 2:, 6] = 0.8
    stat = policy.observe(None, probs)
    assert stat.shape == (2, 2, n)
    kept = select(policy, inputs(n, stat=stat), budget=5)
    # window (8, 9), then the voted position and its pooled neighbours, separately per head
    assert kept == [[2, 3, 4, 8, 9], [5, 6, 7, 8, 9]]


def test_snapkv_rolling_window_across_steps():
    policy = SnapKVPolicy(window_size=3, kernel_size=1)
    stat = policy.observe(None, torch.rand(1, 2, 4))
    stat = policy.observe(torch.nn.functional.pad(stat, (0, 1)), torch.rand(1, 2, 5))
    assert stat.shape == (1, 3, 5)


def test_keyformer_accumulates_gumbel_softmax_scores():
    policy = KeyformerPolicy(tau=2.0, seed=3)
    probs = torch.softmax(torch.randn(1, 3, 6), dim=-1)
    stat = policy.observe(None, probs)
    g = torch.Generator().manual_seed(3)
    u = torch.rand(probs.shape, generator=g).clamp(1e-10, 1 - 1e-10)
    expected = torch.softmax((probs.log() - torch.log(-torch.log(u))) / 2.0, dim=-1).sum(1)
    assert torch.allclose(stat, expected, atol=1e-6)
    assert policy.window(10) == 3
    assert select(policy, inputs(6, heads=1, stat=stat), budget=3)[0] == sorted(expected[0].topk(3).indices.tolist())


def test_policy_options_are_checked():
    assert make_policy("snapkv", {"window_size": 8}).window(100) == 8
    with pytest.raises(InvalidRequestError, match="do not apply"):
        make_policy("tova", {"window_size": 8})
    with pytest.raises(InvalidRequestError, match="pooling"):
        make_policy("snapkv", {"pooling": "median"})
    with pytest.raises(InvalidRequestError, match="unknown"):
        make_policy("magic")

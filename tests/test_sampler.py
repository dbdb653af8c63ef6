"""Sampling rules on hand-made logits."""

import math

import pytest
import torch

from thrifty.engine.sampler import Sampler, apply_penalties, filter_logits
from thrifty.engine.sampling_params import SamplingParams
from thrifty.engine.sequence import Sequence
from thrifty.errors import InvalidRequestError


def seq_with(params: SamplingParams, prompt=(0,), output=()) -> Sequence:
    s = Sequence("r", 0, list(prompt), params)
    s.token_ids.extend(output)
    return s


def test_greedy_takes_the_argmax():
    logits = torch.tensor([[0.1, 3.0, 2.0, -1.0]])
    tokens, _ = Sampler([3])(logits, [seq_with(SamplingParams(temperature=0))])
    assert tokens == [1]


def test_top_k_keeps_k_best():
    kept = filter_logits(torch.tensor([1.0, 4.0, 3.0, 2.0]), top_k=2, top_p=1.0, min_p=0.0)
    assert torch.isinf(kept).tolist() == [True, False, False, True]


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    kept = filter_logits(probs.log(), top_k=0, top_p=0.8, min_p=0.0)
    assert torch.isinf(kept).tolist() == [False, False, True, True]
    kept = filter_logits(probs.log(), top_k=0, top_p=0.81, min_p=0.0)
    assert torch.isinf(kept).tolist() == [False, False, False, True]
    # The most likely token always survives.
    kept = filter_logits(probs.log(), top_k=0, top_p=0.1, min_p=0.0)
    assert torch.isinf(kept).tolist() == [False, True, True, True]


def test_min_p_drops_tokens_below_a_fraction_of_the_best():
    probs = torch.tensor([0.6, 0.25, 0.1, 0.05])
    kept = filter_logits(probs.log(), top_k=0, top_p=1.0, min_p=0.2)  # threshold 0.12
    assert torch.isinf(kept).tolist() == [False, False, True, True]


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    apply_penalties(logits, [seq_with(SamplingParams(repetition_penalty=2.0), prompt=[0], output=[1])])
    assert logits.tolist() == [[1.0, -4.0, 1.0]]


def test_presence_and_frequency_penalties_follow_openai():
    logits = torch.zeros(1, 4)
    seq = seq_with(SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), prompt=[3], output=[1, 1, 2])
    apply_penalties(logits, [seq])
    # token 1: 2 * 0.25 + 0.5; token 2: 0.25 + 0.5; prompt token 3 untouched
    assert logits.tolist() == [[0.0, -1.0, -0.75, 0.0]]


def test_min_tokens_bans_eos_until_reached():
    logits = torch.tensor([[0.0, 0.0, 10.0]])
    tokens, _ = Sampler([2])(logits, [seq_with(SamplingParams(temperature=0, min_tokens=1))])
    assert tokens == [0]


def test_seeded_sampling_is_reproducible_and_follows_the_distribution():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]]))
    sampler = Sampler([])
    draws = []
    for _ in range(2):
        seq = seq_with(SamplingParams(temperature=1.0, seed=1234))
        draws.append([sampler(logits, [seq])[0][0] for _ in range(200)])
    assert draws[0] == draws[1]
    share = draws[0].count(0) / 200
    assert 0.58 < share < 0.82


def test_logprobs_report_the_chosen_token_and_the_top_n():
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    _, logprobs = Sampler([])(logits, [seq_with(SamplingParams(temperature=0, logprobs=2))])
    lp = logprobs[0]
    expected = torch.log_softmax(logits[0], -1)
    assert lp.token_id == 0 and math.isclose(lp.logprob, float(expected[0]), rel_tol=1e-6)
    assert [t for t, _ in lp.top] == [0, 1]


@pytest.mark.parametrize("field,value", [("temperature", -0.5), ("top_p", 1.5), ("top_p", 0.0), ("n", 0),
                                         ("max_tokens", 0), ("min_p", 2.0), ("logprobs", 50), ("top_k", -3),
                                         ("presence_penalty", 3.0), ("repetition_penalty", 0.0)])
def test_invalid_sampling_values_are_refused_with_the_field_named(field, value):
    with pytest.raises(InvalidRequestError, match=field):
        SamplingParams(**{field: value})

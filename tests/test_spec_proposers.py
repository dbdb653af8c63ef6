"""Proposers and drafts on their own: what they propose, tree masks, adaptive draft length."""

import torch

from thrifty.engine.sampling_params import SamplingParams
from thrifty.engine.sequence import Sequence
from thrifty.spec.adaptive import AdaptiveDraftLength, StepCostModel
from thrifty.spec.draft import Draft
from thrifty.spec.history import HistoryProposer
from thrifty.spec.ngram import NgramProposer


def seq_of(tokens: list[int]) -> Sequence:
    return Sequence("r", 0, tokens, SamplingParams())


def test_ngram_proposes_what_followed_the_latest_longest_match():
    proposer = NgramProposer(min_n=1, max_n=3)
    seq = seq_of([1, 2, 3, 4, 5, 9, 2, 3, 7, 8, 1, 2, 3])
    draft = proposer.propose(seq, 4)
    assert draft.token_ids == [4, 5, 9, 2] and draft.is_chain  # "1 2 3" beats the later, shorter "2 3"
    seq.token_ids += [7]
    assert proposer.propose(seq, 2).token_ids == [8, 1]  # "2 3 7"; the index grows incrementally
    seq.token_ids += [6, 2]
    assert proposer.propose(seq, 9).token_ids == [3, 7, 6, 2]  # latest "2": the continuation stops at the end
    assert NgramProposer().propose(seq_of([1, 2, 3]), 4) is None


def test_tree_mask_and_depths():
    draft = Draft([10, 11, 12, 13], [0, 0, 1, 3], "test")
    assert draft.depths == [1, 1, 2, 3]
    assert draft.children[0] == [1, 2] and draft.path_to(4) == [1, 3, 4]
    mask = draft.tree_mask()
    assert mask[4].tolist() == [True, True, False, True, True]
    assert mask[2].tolist() == [True, False, True, False, False]
    assert Draft.chain([1, 2], "test").tree_mask() is None


def test_history_pool_drafts_a_tree_from_recycled_candidates():
    proposer = HistoryProposer(branching=(2, 1), width=2)
    logits = torch.zeros(2, 10)
    logits[0, [3, 4]] = torch.tensor([2.0, 1.0])  # after token 1: 3, then 4
    logits[1, [5, 6]] = torch.tensor([2.0, 1.0])  # after token 3: 5, then 6
    proposer.observe([1, 3], logits)
    draft = proposer.propose(seq_of([7, 1]), 8)
    assert draft.token_ids == [3, 4, 5] and draft.parents == [0, 0, 1]


def test_adaptive_length_falls_back_when_drafts_are_rejected():
    cost = StepCostModel()
    for tokens in (1, 4, 8) * 5:
        cost.record(tokens, 1.0 + 0.1 * tokens)
    a, b = cost.coefficients()
    assert abs(b / a - 0.1) < 0.02
    control = AdaptiveDraftLength(cost)
    seq = seq_of([1, 2, 3])
    assert control.draft_length(seq, 5, 1, 1) > 0
    for _ in range(10):
        control.update(seq, 0, 5)
    assert control.draft_length(seq, 5, 1, 1) == 0
    for _ in range(10):
        control.update(seq, 5, 5)
    assert control.draft_length(seq, 5, 1, 1) == 5


def test_adaptive_sequences_start_from_and_relax_towards_their_proposers_record():
    cost = StepCostModel()
    for tokens in (1, 4, 8) * 5:
        cost.record(tokens, 1.0 + 0.1 * tokens)
    control = AdaptiveDraftLength(cost)
    assert control.acceptance(seq_of([1]), "ngram") == control.prior  # nothing known yet
    for _ in range(40):
        control.update(seq_of([1, 2]), 0, 4, "ngram")
    poor = control.proposer_acceptance("ngram")
    assert poor < 0.1
    newcomer = seq_of([5, 6])
    assert control.draft_length(newcomer, 5, 1, 1, proposer="ngram") == 0  # no optimistic first draft
    assert abs(control.acceptance(newcomer, "ngram") - poor) < 1e-9
    assert control.acceptance(seq_of([7]), "history") == control.prior  # other proposers keep their own record
    hopeful = seq_of([8])
    for _ in range(10):
        control.update(hopeful, 4, 4, "history")
    for _ in range(200):
        control.idle(hopeful, "history")
    assert control.acceptance(hopeful, "history") > 0.6  # drifts towards history's (good) record

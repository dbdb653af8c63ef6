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
    proposer = NgramProposer(min_n=1, max_n=3, short_match_caps={})
    seq = seq_of([1, 2, 3, 4, 5, 9, 2, 3, 7, 8, 1, 2, 3])
    draft = proposer.propose(seq, 4)
    assert draft.token_ids == [4, 5, 9, 2] and draft.is_chain  # "1 2 3" beats the later, shorter "2 3"
    seq.token_ids += [7]
    assert proposer.propose(seq, 2).token_ids == [8, 1]  # "2 3 7"; the index grows incrementally
    seq.token_ids += [6, 2]
    assert proposer.propose(seq, 9).token_ids == [3, 7, 6, 2]  # latest "2": the continuation stops at the end
    assert NgramProposer().propose(seq_of([1, 2, 3]), 4) is None
    assert NgramProposer(max_n=3).propose(seq, 9).token_ids == [3, 7]  # a 1-token match drafts 2 at most


def test_ngram_drafts_in_full_only_after_a_long_match():
    tokens = [*range(10, 40)]
    proposer = NgramProposer()  # caps: 2 tokens after a 1-token match, 8 after a 2-token one
    assert proposer.propose(seq_of([*tokens, 5, 10]), 16).token_ids == [11, 12]
    assert proposer.propose(seq_of([*tokens, 5, 10, 11]), 16).token_ids == list(range(12, 20))
    assert proposer.propose(seq_of([*tokens, 10, 11, 12, 13]), 16).token_ids == list(range(14, 30))


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
    proposer.observe([1, 3], logits, [None, 1])
    draft = proposer.propose(seq_of([7, 1]), 8)
    assert draft.token_ids == [3, 4, 5] and draft.parents == [0, 0, 1]


def test_history_pool_prefers_the_candidates_seen_after_the_same_pair():
    proposer = HistoryProposer(branching=(1, 1), width=1)
    after_8_1, after_9_1, after_1_5 = torch.zeros(1, 10), torch.zeros(1, 10), torch.zeros(1, 10)
    after_8_1[0, 5] = after_9_1[0, 6] = after_1_5[0, 2] = 1.0
    proposer.observe([1], after_8_1, [8])  # after "8 1" the target wanted 5
    proposer.observe([1], after_9_1, [9])  # after "9 1" it wanted 6 (the latest for token 1 alone)
    proposer.observe([5], after_1_5, [1])  # after "1 5": 2
    assert proposer.propose(seq_of([8, 1]), 4).token_ids == [5, 2]  # the pair decides, also one level down
    assert proposer.propose(seq_of([9, 1]), 4).token_ids == [6]
    assert proposer.propose(seq_of([7, 1]), 4).token_ids == [6]  # unseen pair: the token's latest candidates


def test_history_pair_table_keeps_the_most_recently_written_pairs():
    proposer = HistoryProposer(branching=(1,), width=1, max_pairs=2)
    rows = torch.eye(10)
    proposer.observe([1], rows[[5]], [8])  # (8, 1) -> 5
    proposer.observe([2], rows[[6]], [8])  # (8, 2) -> 6
    proposer.observe([1], rows[[7]], [8])  # (8, 1) rewritten -> 7: now the most recent
    proposer.observe([3], rows[[4]], [8])  # a third pair: (8, 2), the least recent, goes
    assert list(proposer.next_after_pair) == [(8, 1), (8, 3)]
    assert proposer.propose(seq_of([8, 1]), 1).token_ids == [7]



def test_history_pool_goes_back_to_a_snapshot_or_to_empty():
    proposer = HistoryProposer(branching=(1,), width=1)
    rows = torch.eye(10)
    proposer.observe([1], rows[[5]], [8])  # (8, 1) -> 5
    snapshot = proposer.snapshot()
    proposer.observe([1], rows[[7]], [8])  # rewritten after the snapshot -> 7
    proposer.observe([2], rows[[3]], [8])  # learned after it
    assert proposer.propose(seq_of([8, 1]), 1).token_ids == [7]
    proposer.restore(snapshot)
    assert proposer.propose(seq_of([8, 1]), 1).token_ids == [5]
    assert proposer.propose(seq_of([8, 2]), 1) is None
    proposer.restore()
    assert proposer.propose(seq_of([8, 1]), 1) is None

def test_adaptive_length_falls_back_when_drafts_are_rejected():
    cost = StepCostModel()
    for tokens in (1, 4, 8) * 5:
        cost.record(tokens, 1.0 + 0.1 * tokens)
    a, b, c = cost.coefficients()
    assert abs(b / a - 0.1) < 0.02 and c < 0.02 * a
    control = AdaptiveDraftLength(cost)
    seq = seq_of([1, 2, 3])
    assert control.draft_length(seq, 5, 1, 1) > 0
    for _ in range(10):
        control.update(seq, 0, 5)
    assert control.draft_length(seq, 5, 1, 1) == 0
    for _ in range(10):
        control.update(seq, 5, 5)
    assert control.draft_length(seq, 5, 1, 1) == 5


def test_cost_model_separates_a_drafted_sequences_fixed_cost_and_the_controller_heeds_it():
    # Batch of one: plain steps (T=1) cost 1.0; a drafted step costs 0.5 more plus 0.05 per draft token.
    cost = StepCostModel()
    for k in (0, 1, 0, 2, 0, 3, 0, 1, 0, 4) * 4:
        cost.record(1 + k, 1.0 + (0.5 + 0.05 * k if k else 0.0), 1 if k else 0)
    a, b, c = cost.coefficients()
    assert abs(a - 0.95) < 0.03 and abs(b - 0.05) < 0.01 and abs(c - 0.5) < 0.03
    control = AdaptiveDraftLength(cost)
    seq = seq_of([1, 2, 3])
    for _ in range(20):  # about 0.4 accepted per draft token: worth it if a draft token cost only b
        control.update(seq, 1, 3)
        control.update(seq, 0, 3)
    assert 0.2 < control.acceptance(seq) < 0.5
    assert control.draft_length(seq, 5, 1, 1) == 0
    cheap = StepCostModel()
    for k in (0, 1, 0, 2, 0, 3, 0, 1, 0, 4) * 4:
        cheap.record(1 + k, 1.0 + 0.05 * k, 1 if k else 0)
    control.cost = cheap
    assert control.draft_length(seq, 5, 1, 1) > 0


def test_a_drafters_passes_are_priced_by_the_sequences_sharing_them():
    """In a batch of B a draft must buy B tokens' worth of time: a draft model's pass that pays at
    batch 1, or when all B sequences share it, does not pay for one sequence drafting alone."""
    cost = StepCostModel()
    for _ in range(20):
        cost.record(4, 1.0)  # plain steps of a batch of four: 1 s
    control = AdaptiveDraftLength(cost, probe_drafts=0)
    good = [seq_of([1, 2, 3]) for _ in range(4)]
    for seq in good:
        for _ in range(10):
            control.update(seq, 5, 5)  # nearly always accepted
    poor = [seq_of([4, 5]) for _ in range(3)]
    for seq in poor:
        for _ in range(10):
            control.update(seq, 0, 5)  # never accepted
    pass_seconds = 0.5  # one draft pass: half a step
    assert control.draft_length(good[0], 5, 1, 1, pass_seconds) > 0
    assert all(k > 0 for k in control.draft_lengths([(seq, 5, pass_seconds, 0.0) for seq in good], 4))
    # With the other three not drafting, the one good sequence would pay the passes alone.
    alone = control.draft_lengths([(seq, 5, pass_seconds, 0.0) for seq in good[:1] + poor], 4)
    assert alone == [0, 0, 0, 0]


def test_drafted_steps_cost_is_kept_through_plain_decoding_and_fitted_without_clipping():
    """Drafted steps that cost less than b's prior implies are fitted with c = 0 (not clipped after
    the fit, which overstated them), and a long spell of plain steps does not fade them away."""
    cost = StepCostModel()
    for _ in range(10):
        cost.record(1, 1.0)
        cost.record(6, 1.1, 1)  # five extra rows cost 0.1 s, below the prior's b = 0.1 a per row
    for _ in range(200):
        cost.record(1, 1.0)
    a, b, c = cost.coefficients()
    assert c == 0.0
    assert abs(a + b - 1.0) < 0.01 and abs(a + 6 * b - 1.1) < 0.02


def test_drafts_accepted_in_runs_are_drafted_longer_than_one_per_token_rate_implies():
    cost = StepCostModel()
    for _ in range(20):
        cost.record(1, 1.0)
    control = AdaptiveDraftLength(cost, probe_drafts=0)
    seq = seq_of([1, 2, 3])
    for _ in range(10):  # whole drafts accepted, or rejected at their first token
        control.update(seq, 5, 5, "runs")
        control.update(seq, 0, 5, "runs")
    assert 0.7 < control.acceptance(seq, "runs") < 0.9
    # A proposer with no record of its own draft depths falls back to the per-token rate.
    assert control.draft_length(seq, 5, 1, 1, 0.5, proposer="runs") == 5
    assert control.draft_length(seq, 5, 1, 1, 0.5, proposer="geometric") < 5


def test_an_idle_proposer_is_probed_again_less_often_after_each_failed_probe():
    cost = StepCostModel()
    for _ in range(20):
        cost.record(1, 1.0)
    control = AdaptiveDraftLength(cost, probe_drafts=0, reprobe_after=4)
    seq = seq_of([1, 2, 3])
    for _ in range(10):
        control.update(seq, 0, 5, "draft")  # never accepted

    def decisions_until_a_probe() -> int:
        for n in range(1, 100):
            if control.draft_length(seq, 5, 1, 1, 0.5, proposer="draft") > 0:
                return n
        return 0

    assert decisions_until_a_probe() == 5  # four idle decisions, then a probe
    control.update(seq, 0, 1, "draft")  # it failed
    assert decisions_until_a_probe() == 9
    control.update(seq, 1, 1, "draft")  # this one had its token accepted: back to the first wait
    assert decisions_until_a_probe() == 5


def test_speculator_feeds_the_cost_model_decode_steps_only():
    from thrifty.engine.scheduler import ScheduledSequence
    from thrifty.spec.speculator import Speculator

    class _Blocks:
        block_size = 16

    spec = Speculator(_Blocks(), [], eos_token_ids=[0], max_model_len=64)  # type: ignore[arg-type]
    prefill = ScheduledSequence(seq=seq_of([1, 2, 3]), num_tokens=3)
    spec.record_step([prefill], 5.0)
    assert spec.cost.coefficients() == (1.0, spec.cost.prior_ratio, 0.0)  # nothing recorded
    spec.record_step([ScheduledSequence(seq=seq_of([1, 2, 3]), num_tokens=1)], 0.05)
    assert abs(spec.cost.coefficients()[0] - 0.05 / 1.1) < 1e-9


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
    for _ in range(10):
        control.update(seq_of([1]), 4, 4, "ngram")  # ngram does well elsewhere now ...
    assert control.proposer_acceptance("ngram") > 0.5
    stubborn = seq_of([9])
    for _ in range(10):
        control.update(stubborn, 0, 4, "ngram")  # ... but never for this sequence
    for _ in range(200):
        control.idle(stubborn, "ngram")
    assert control.acceptance(stubborn, "ngram") < 0.15  # its own record, not ngram's, is where it drifts


def test_a_drafters_catch_up_must_pay_back_over_the_tokens_still_to_come():
    from thrifty.spec.draft import Draft, PerSequenceProposer
    from thrifty.spec.speculator import Speculator

    class _Blocks:
        block_size = 16

    class Drafter(PerSequenceProposer):
        name = "draft"
        catch_up = 0.0

        def propose(self, seq, max_tokens):
            return Draft.chain([7] * max_tokens, self.name)

        def pending_seconds(self, seq):
            return self.catch_up

    drafter = Drafter()
    spec = Speculator(_Blocks(), [], eos_token_ids=[0], max_model_len=4096,  # type: ignore[arg-type]
                      model_drafters={"draft": lambda: drafter})
    for k in (0, 1, 0, 2, 0, 3) * 4:  # 1 s steps, 0.1 s per draft token, no fixed cost
        spec.cost.record(1 + k, 1.0 + 0.1 * k, 1 if k else 0)
    spec.adaptive.probe_drafts = 0  # the margin decides from the first draft

    def decoding(max_tokens):
        seq = Sequence("r", 0, list(range(1, 30)), SamplingParams(speculative="draft", max_tokens=max_tokens))
        seq.num_computed_tokens = seq.num_tokens - 1
        return seq

    spec.propose([seq := decoding(100)])
    assert seq.draft is not None  # nothing to read first: the prior acceptance (0.6) pays
    drafter.catch_up = 20.0
    spec.propose([seq := decoding(100)])
    assert seq.draft is not None  # 20 s spread over 100 tokens to come: 0.2 s per step still pays
    spec.propose([seq := decoding(4)])
    assert seq.draft is None  # the same 20 s over 4 tokens does not


def test_draft_cap_comes_from_the_request_then_the_engine_then_the_proposer():
    from thrifty.spec.speculator import Speculator

    class _Blocks:
        block_size = 16

    def decoding(**params):
        seq = Sequence("r", 0, [*range(10, 40), 10, 11, 12, 13], SamplingParams(speculative="ngram", **params))
        seq.num_computed_tokens = seq.num_tokens - 1
        return seq

    for engine_cap, request_cap, expected in ((None, None, 16), (4, None, 4), (4, 2, 2)):
        spec = Speculator(_Blocks(), [], eos_token_ids=[0], max_model_len=4096,  # type: ignore[arg-type]
                          num_speculative_tokens=engine_cap, adaptive=False)
        spec.propose([seq := decoding(num_speculative_tokens=request_cap)])
        assert seq.draft.token_ids == list(range(14, 14 + expected))  # "10 11 12 13" matched: 26 tokens follow


def test_a_proposers_first_drafts_are_probes_then_the_margin_decides():
    cost = StepCostModel()
    for k in (0, 1, 0, 2) * 5:  # a drafted sequence costs a whole extra step: nothing pays at prior acceptance
        cost.record(1 + k, 2.0 if k else 1.0, 1 if k else 0)
    control = AdaptiveDraftLength(cost, probe_drafts=3)
    for _ in range(3):
        seq = seq_of([1, 2])
        assert control.draft_length(seq, 5, 1, 1, proposer="draft") == 5  # probing: every depth gets measured
        control.update(seq, 1, 2, "draft")
    assert control.draft_length(seq_of([1, 2]), 5, 1, 1, proposer="draft") == 0
    for _ in range(3):
        control.update(seq_of([3]), 5, 5, "draft")  # it turned out nearly always right
    assert control.draft_length(seq_of([1, 2]), 5, 1, 1, proposer="draft") > 0


def test_a_dry_draft_scored_token_by_token_counts_like_the_verified_draft():
    seq = seq_of([1])
    verified, dry = AdaptiveDraftLength(StepCostModel()), AdaptiveDraftLength(StepCostModel())
    for accepted, depth in ((3, 5), (5, 5), (0, 4)):
        verified.update(seq, accepted, depth, "ngram")
        dry.begin_dry_draft(seq, "ngram")
        for _ in range(accepted):
            dry.dry_token(seq, True, "ngram")
        if accepted < depth:
            dry.dry_token(seq, False, "ngram")
        assert abs(verified.acceptance(seq, "ngram") - dry.acceptance(seq, "ngram")) < 1e-12
        assert abs(verified.proposer_acceptance("ngram") - dry.proposer_acceptance("ngram")) < 1e-12


def test_a_sequence_that_stopped_drafting_resumes_when_its_dry_drafts_come_true():
    """Prompt lookup stops drafting while the output departs from the prompt; the unverified lookups
    it keeps making show when the output starts copying again, within a few tokens."""
    from thrifty.engine.scheduler import ScheduledSequence
    from thrifty.spec.speculator import Speculator

    class _Blocks:
        block_size = 16

    spec = Speculator(_Blocks(), [], eos_token_ids=[0], max_model_len=4096)  # type: ignore[arg-type]
    for k in (0, 1, 0, 2, 0, 3) * 4:  # 1 s steps, 0.05 s per draft token, 0.2 s per drafted sequence
        spec.cost.record(1 + k, 1.0 + (0.2 + 0.05 * k if k else 0.0), 1 if k else 0)
    prompt = list(range(100, 160))
    seq = Sequence("r", 0, prompt + [7], SamplingParams(speculative="ngram", max_tokens=200))
    seq.num_computed_tokens = seq.num_tokens - 1
    for _ in range(12):
        spec.adaptive.update(seq, 0, 8, "ngram")  # its drafts were all rejected so far
    logits = torch.zeros(1, 200)

    def plain_step(token: int) -> bool:
        """One step; True if the sequence drafted."""
        spec.propose([seq])
        if seq.draft is not None:
            return True
        spec.sample([ScheduledSequence(seq=seq, num_tokens=1)], logits, lambda rows, seqs: ([token], [None]))
        seq.token_ids.append(token)
        seq.num_computed_tokens += 1
        return False

    for token in range(8, 28):  # new text, nothing to look up
        assert not plain_step(token)
    assert spec.adaptive.acceptance(seq, "ngram") < 0.1
    copied = 0
    while copied < 20 and not plain_step(prompt[10 + copied]):
        copied += 1
    assert copied <= 4  # one copied token to find the match, a few to trust it
    assert seq.draft.token_ids == prompt[10 + copied:10 + copied + len(seq.draft)]

"""Continuous batching: token budget, chunked prefill, admission control, preemption, priority."""

from thrifty.engine.sampling_params import SamplingParams
from thrifty.engine.scheduler import Scheduler
from thrifty.engine.sequence import Sequence, SequenceStatus
from thrifty.kv.blocks import BlockManager


def make_seq(n_prompt: int, priority: int = 0, arrival: float = 0.0, request: str = "r") -> Sequence:
    return Sequence(request, 0, list(range(1, n_prompt + 1)), SamplingParams(priority=priority), arrival)


def run_step(scheduler: Scheduler, new_token: int = 7):
    """Pretend the model ran: advance computed counts and append a token to completed sequences."""
    out = scheduler.schedule()
    for item in out.scheduled:
        completes = item.completes
        item.seq.num_computed_tokens += item.num_tokens
        if completes:
            item.seq.token_ids.append(new_token)
    return out


def test_long_prompt_is_prefilled_in_chunks_under_the_budget():
    sched = Scheduler(BlockManager(64, 4, enable_prefix_caching=False), max_num_seqs=8, max_num_batched_tokens=16)
    seq = make_seq(40)
    sched.add(seq)
    chunks = []
    while seq.num_output_tokens == 0:
        out = run_step(sched)
        chunks.append(out.scheduled[0].num_tokens)
    assert chunks == [16, 16, 8]
    assert seq.num_cached_slots == 40


def test_decodes_and_a_new_prefill_share_one_step():
    sched = Scheduler(BlockManager(64, 4, enable_prefix_caching=False), max_num_seqs=8, max_num_batched_tokens=10)
    a = make_seq(5, arrival=0)
    sched.add(a)
    run_step(sched)  # a prefilled, now decoding
    b = make_seq(30, arrival=1)
    sched.add(b)
    out = run_step(sched)
    assert [(s.seq, s.num_tokens) for s in out.scheduled] == [(a, 1), (b, 9)]
    assert out.num_tokens == 10


def test_admission_never_overcommits_the_pool():
    bm = BlockManager(num_blocks=10, block_size=4, enable_prefix_caching=False)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=100)
    seqs = [make_seq(12, arrival=i, request=str(i)) for i in range(5)]  # 3 blocks each
    for s in seqs:
        sched.add(s)
    out = run_step(sched)
    # 3 + 3 + 3 blocks fit with the one-block watermark to spare; a fourth would not fit at all.
    assert len(out.scheduled) == 3
    assert bm.num_free_blocks >= 0
    assert sum(len(s.block_table) for s in seqs) + bm.num_free_blocks == bm.num_blocks


def test_preemption_frees_the_latest_sequence_and_requeues_it_for_recompute():
    bm = BlockManager(num_blocks=5, block_size=4, enable_prefix_caching=False)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=100)
    a, b = make_seq(7, arrival=0, request="a"), make_seq(7, arrival=1, request="b")
    sched.add(a)
    sched.add(b)
    run_step(sched)  # both prefilled: 2 blocks each, one block left
    assert bm.num_free_blocks == 1
    assert not run_step(sched).preempted  # the 8th slot still fits in the second block
    out = run_step(sched)  # the 9th slot needs a third block each: only one is free
    assert out.preempted == [b]  # b arrived later, so it gives way
    assert [s.seq for s in out.scheduled] == [a]
    assert b.status is SequenceStatus.WAITING and b.block_table == [] and b.num_computed_tokens == 0
    assert b.num_tokens == 9  # its generated tokens are kept and will be recomputed
    assert a.status is SequenceStatus.RUNNING


def test_priority_policy_admits_lower_values_first():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=1, max_num_batched_tokens=100, policy="priority")
    late_urgent = make_seq(4, priority=-1, arrival=5, request="urgent")
    early = make_seq(4, priority=0, arrival=0, request="early")
    sched.add(early)
    sched.add(late_urgent)
    out = run_step(sched)
    assert [s.seq for s in out.scheduled] == [late_urgent]


def test_fcfs_ignores_priority():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=1, max_num_batched_tokens=100, policy="fcfs")
    late_urgent = make_seq(4, priority=-1, arrival=5, request="urgent")
    early = make_seq(4, priority=0, arrival=0, request="early")
    sched.add(late_urgent)
    sched.add(early)
    assert [s.seq for s in run_step(sched).scheduled] == [early]


def test_finish_returns_every_block():
    bm = BlockManager(num_blocks=16, block_size=4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=100)
    seqs = [make_seq(9, arrival=i, request=str(i)) for i in range(3)]
    for s in seqs:
        sched.add(s)
    run_step(sched)
    for s in seqs:
        sched.finish(s)
    assert bm.num_free_blocks == 16 and not sched.has_unfinished()

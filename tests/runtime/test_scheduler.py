"""Scheduler: token budget and chunked prefill, the sequence cap, decodes first, FCFS, preemption order."""

from __future__ import annotations

import itertools

from kubellm.runtime.config import SchedulerConfig
from kubellm.runtime.engine.block_manager import BlockManager
from kubellm.runtime.engine.scheduler import Scheduler, SchedulerOutput
from kubellm.runtime.engine.sequence import Request, Sequence, SequenceStatus
from kubellm.runtime.outputs import RequestMetrics
from kubellm.runtime.sampling_params import SamplingParams

BS = 4
_ids = itertools.count()


def make_scheduler(num_blocks: int = 64, budget: int = 64, max_num_seqs: int = 8) -> Scheduler:
    return Scheduler(SchedulerConfig(max_num_seqs, budget, 1024), BlockManager(num_blocks, BS))


def add(scheduler: Scheduler, num_tokens: int, priority: int = 0) -> Sequence:
    n = next(_ids)
    tokens = [1000 * n + i for i in range(num_tokens)]  # unique: no accidental prefix hits
    request = Request(f"r{n}", tokens, SamplingParams(), priority, n, RequestMetrics(0.0))
    seq = Sequence(n, request, 0, list(tokens), num_tokens)
    request.seqs.append(seq)
    scheduler.add(seq)
    return seq


def finish_step(scheduler: Scheduler, out: SchedulerOutput) -> None:
    """What the engine does after the model ran: mark computed, append a token to sampling sequences."""
    scheduler.update_computed(out)
    for s in out.scheduled:
        if s.samples:
            s.seq.token_ids.append(7)


def plan(out: SchedulerOutput) -> list[tuple[Sequence, int]]:
    return [(s.seq, s.num_new_tokens) for s in out.scheduled]


def test_token_budget_chunks_prefills() -> None:
    sched = make_scheduler(budget=16)
    a, b, c = add(sched, 10), add(sched, 10), add(sched, 10)
    out = sched.schedule()
    assert plan(out) == [(a, 10), (b, 6)]
    assert [s.samples for s in out.scheduled] == [True, False]  # b's chunk does not reach its end
    finish_step(sched, out)
    out = sched.schedule()
    # a decodes first, then b finishes its prompt, then c starts with what is left
    assert plan(out) == [(a, 1), (b, 4), (c, 10)]
    finish_step(sched, out)
    assert sched.waiting == []


def test_sequence_cap() -> None:
    sched = make_scheduler(max_num_seqs=2)
    a, b, c = add(sched, 3), add(sched, 3), add(sched, 3)
    out = sched.schedule()
    assert plan(out) == [(a, 3), (b, 3)]
    finish_step(sched, out)
    assert plan(sched.schedule()) == [(a, 1), (b, 1)]
    assert sched.waiting == [c]


def test_fcfs_head_of_line_is_not_overtaken() -> None:
    sched = make_scheduler(num_blocks=4)
    big = add(sched, 20)  # needs 5 blocks: cannot be admitted while `small`... nor ever on 4 blocks here
    small = add(sched, 2)
    assert plan(sched.schedule()) == []
    assert sched.waiting == [big, small]


def test_priority_orders_the_waiting_queue() -> None:
    sched = make_scheduler(budget=4)
    low = add(sched, 4, priority=5)
    high = add(sched, 4, priority=-1)
    assert plan(sched.schedule()) == [(high, 4)]
    assert sched.waiting == [low]


def test_preemption_frees_the_newest_and_recomputes_it_later() -> None:
    # 4 blocks of 4 slots: two sequences of 7 tokens hold 2 blocks each; the first decode that crosses a block
    # boundary has to preempt
    sched = make_scheduler(num_blocks=4)
    old, new = add(sched, 7), add(sched, 7)
    finish_step(sched, sched.schedule())  # both prefilled, 8 tokens each now, 2 blocks each
    out = sched.schedule()  # each decode writes position 7: still inside block 2
    assert plan(out) == [(old, 1), (new, 1)]
    finish_step(sched, out)
    out = sched.schedule()  # position 8 needs a third block each: `new` is preempted, `old` proceeds
    assert plan(out) == [(old, 1)]
    assert out.preempted == [new]
    assert new.status is SequenceStatus.WAITING and new.block_table == [] and new.num_computed_tokens == 0
    assert sched.num_preemptions == 1 and new.request.metrics.num_preemptions == 1
    assert sched.waiting == [new] and sched.running == [old]
    # once `old` is gone, `new` is recomputed: its first block is still in the prefix cache (its second block,
    # freed first, was evicted for `old`'s new block), so 5 of its 9 tokens remain to compute
    finish_step(sched, out)
    sched.remove(old)
    out = sched.schedule()
    assert plan(out) == [(new, 5)] and out.scheduled[0].samples
    assert new.num_computed_tokens == 4


def test_preemption_takes_the_lowest_priority_first() -> None:
    sched = make_scheduler(num_blocks=6)
    important = add(sched, 7, priority=0)
    unimportant = add(sched, 7, priority=9)
    middle = add(sched, 7, priority=1)
    finish_step(sched, sched.schedule())
    finish_step(sched, sched.schedule())  # 9 tokens each: each needs a third block, 6 blocks in all
    out = sched.schedule()
    assert out.preempted == [unimportant]
    assert plan(out) == [(important, 1), (middle, 1)]


def test_a_sequence_preempts_itself_when_it_is_the_least_important() -> None:
    sched = make_scheduler(num_blocks=4)
    first = add(sched, 7, priority=0)
    second = add(sched, 7, priority=0)
    finish_step(sched, sched.schedule())
    finish_step(sched, sched.schedule())
    out = sched.schedule()
    assert out.preempted == [second]
    assert [s.seq for s in out.scheduled] == [first]
    assert first.status is SequenceStatus.RUNNING

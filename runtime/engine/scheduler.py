"""Scheduler: iteration-level continuous batching under a token budget.

Every step builds ONE mixed batch: first the running sequences (decodes, plus chunked prefills still in
progress), in priority order, then as many waiting sequences as the token budget (``max_num_batched_tokens``),
the sequence cap (``max_num_seqs``) and the free KV blocks allow; a long prompt is prefilled in chunks across
steps. When a running sequence needs a block and none is free, the least important running sequence (highest
priority value, newest arrival) is preempted: its blocks are freed and it goes back to the head of the waiting
queue to be recomputed later (cheaply, when its blocks are still in the prefix cache). Nothing is dropped.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..config import SchedulerConfig
from .block_manager import BlockManager
from .sequence import Sequence, SequenceStatus


@dataclass
class ScheduledSeq:
    """One sequence's share of a step. With speculation the step also feeds ``draft_token_ids`` after its last
    token (their KV slots are allocated), and each of the ``1 + len(draft_token_ids)`` positions yields logits.

    ::

        token_ids:  ... t[n-1] | d0 d1 .. d[k-1]        query = [t[n-1], d0, .., d[k-1]]   (num_new_tokens = 1)
        logits of:      t[n-1]   d0 ..       d[k-1]     row j verifies d[j]; row k samples the token after them
    """

    seq: Sequence
    num_new_tokens: int  # tokens computed this step: token_ids[num_computed_tokens : + num_new_tokens]
    start: int = 0  # num_computed_tokens when scheduled
    samples: bool = False  # the step reaches the last token, so its logits are sampled
    draft_token_ids: list[int] = field(default_factory=list)

    @classmethod
    def of(cls, seq: Sequence, num_new_tokens: int, draft_token_ids: list[int] | None = None) -> ScheduledSeq:
        start = seq.num_computed_tokens
        return cls(seq, num_new_tokens, start, start + num_new_tokens == seq.num_tokens, draft_token_ids or [])

    @property
    def num_query_tokens(self) -> int:
        """Positions fed to the model this step: the new tokens and the drafts."""
        return self.num_new_tokens + len(self.draft_token_ids)

    @property
    def num_sample_rows(self) -> int:
        return 1 + len(self.draft_token_ids) if self.samples else 0


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_query_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        block_manager: BlockManager,
        on_free: Callable[[Sequence], None] | None = None,
    ) -> None:
        """``on_free(seq)``: called whenever a sequence's blocks are freed (finish, abort, preemption), for state
        kept beside the KV cache (a draft model's own cache)."""
        self.config = config
        self.block_manager = block_manager
        self.on_free = on_free
        self.waiting: list[Sequence] = []  # kept sorted by Sequence.sort_key
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        bisect.insort(self.waiting, seq, key=lambda s: s.sort_key)

    def add_running(self, seq: Sequence) -> None:
        """A forked choice: it already holds (shared) blocks and runs from the next step on."""
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out of the queues and free its blocks (finished or aborted)."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        self._free(seq)
        seq.status = SequenceStatus.FINISHED

    def _free(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        if self.on_free is not None:
            self.on_free(seq)

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self._free(seq)  # resets num_computed_tokens: recompute from scratch (or the prefix cache)
        seq.num_preemptions += 1
        seq.request.metrics.num_preemptions += 1
        self.num_preemptions += 1
        self.add(seq)
        out.preempted.append(seq)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        bm = self.block_manager
        budget = self.config.max_num_batched_tokens

        # 1. running sequences, most important first; the tail of `queue` is the preemption victim pool
        queue = sorted(self.running, key=lambda s: s.sort_key)
        running: list[Sequence] = []
        while queue:
            seq = queue.pop(0)
            if budget == 0:
                running.append(seq)  # keeps its blocks, runs next step
                continue
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            drafts = self._take_drafts(seq, num_new, budget, len(queue))
            while not bm.allocate_slots(seq, seq.num_computed_tokens + num_new):
                victim = queue.pop() if queue else seq
                self._preempt(victim, out)
                if victim is seq:
                    break
            else:
                out.scheduled.append(ScheduledSeq.of(seq, num_new, drafts))
                running.append(seq)
                budget -= num_new + len(drafts)
        self.running = running

        # 2. waiting sequences in order, while they fit (no admission in a step that had to preempt)
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs and not out.preempted:
            seq = self.waiting[0]
            # a prompt being scored is computed in full: a cached block has no logits to score
            num_admitted = bm.allocate_prefill(seq, budget, use_prefix_cache=not seq.needs_prompt_logprobs)
            if num_admitted is None:
                break  # FCFS: nobody overtakes the head of the queue
            if seq.num_preemptions == 0 and seq.index == 0:
                seq.request.metrics.num_cached_tokens = seq.num_computed_tokens
                seq.request.metrics.first_scheduled_time = time.monotonic()
            self.waiting.pop(0)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.scheduled.append(ScheduledSeq.of(seq, num_admitted))
            budget -= num_admitted
        return out

    def _take_drafts(self, seq: Sequence, num_new: int, budget: int, num_queued: int) -> list[int]:
        """The drafts ``seq`` verifies this step, their slots allocated: only when the step reaches its last token,
        within the token budget, and with blocks to spare (one kept back for each of the ``num_queued`` sequences
        still to schedule): a guess must not preempt anyone."""
        bm = self.block_manager
        drafts, seq.draft_token_ids = seq.draft_token_ids[: budget - num_new], []
        if not drafts or seq.num_computed_tokens + num_new != seq.num_tokens:
            return []
        end = seq.num_tokens + len(drafts)
        if bm.num_blocks_needed(seq, end) > bm.num_free_blocks - num_queued or not bm.allocate_slots(seq, end):
            return []
        return drafts

    def update_computed(self, out: SchedulerOutput) -> None:
        """After the model ran: the scheduled tokens now have KV; full blocks join the prefix cache."""
        for s in out.scheduled:
            s.seq.num_computed_tokens += s.num_new_tokens
            self.block_manager.register_computed_blocks(s.seq)

"""The engine's side of speculation: before a step, drafts for the running sequences that decode; after it, the
acceptance counters (vLLM's ``vllm:spec_decode_*``).

A draft never reaches past what the sequence may still produce: a step emits at most ``len(drafts) + 1`` tokens
(the accepted drafts and one token sampled after them), so drafts are capped by ``max_tokens`` and the context.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from ..outputs import SpecDecodeCounters
from .config import SpeculativeConfig
from .ngram import propose_ngram
from .suffix import SuffixCache

if TYPE_CHECKING:
    from ..engine.sequence import Sequence
    from .draft_model import DraftModel


MAX_BACKOFF_STEPS = 8


class Speculator:
    def __init__(self, config: SpeculativeConfig, max_seq_len: int, draft_model: DraftModel | None = None) -> None:
        """``draft_model``: the proposer of method draft_model (built by the engine: it needs the KV budget)."""
        if (config.method == "draft_model") != (draft_model is not None):
            raise ValueError(f"speculative_config.method {config.method!r}: a draft model goes with draft_model only")
        self.config = config
        self.max_seq_len = max_seq_len
        self.stats = SpecDecodeCounters(num_accepted_tokens_per_pos=[0] * config.num_speculative_tokens)
        self.suffix_cache: SuffixCache | None = None
        if config.method == "suffix":
            self.suffix_cache = SuffixCache(
                config.suffix_decoding_max_cached_requests, config.prompt_lookup_min, config.prompt_lookup_max
            )
        self.draft_model = draft_model

    def propose(self, running: list[Sequence]) -> None:
        """Set ``draft_token_ids`` of each running sequence whose next step is a decode (cleared elsewhere)."""
        cfg = self.config
        for seq in running:
            seq.draft_token_ids = []
        if cfg.disable_by_batch_size is not None and len(running) > cfg.disable_by_batch_size:
            return
        wanted = [(seq, k) for seq in running if self._may_speculate(seq) and (k := self._num_drafts(seq)) >= 1]
        if self.draft_model is not None:
            # a draft model always has a guess: a sequence backing off skips its forward altogether
            batch = []
            for seq, k in wanted:
                if seq.spec_skip_steps:
                    seq.spec_skip_steps -= 1
                else:
                    batch.append((seq, k))
            self.draft_model.propose(batch)
            return
        for seq, k in wanted:
            seq.draft_token_ids = self._lookup(seq, k)
            if seq.draft_token_ids and seq.spec_skip_steps:  # backing off after failed guesses
                seq.spec_skip_steps -= 1
                seq.draft_token_ids = []

    def release(self, seq: Sequence) -> None:
        """The target freed the sequence's KV blocks (finished, aborted or preempted)."""
        if self.draft_model is not None:
            self.draft_model.release(seq)

    def _may_speculate(self, seq: Sequence) -> bool:
        if seq.num_tokens - seq.num_computed_tokens != 1:  # a prefill (chunk) or a recompute
            return False
        # while a reasoning model thinks, its grammar waits to switch on at a token we cannot see coming
        return seq.grammar is None or seq.grammar_active

    def _num_drafts(self, seq: Sequence) -> int:
        params = seq.params
        room = self.max_seq_len - seq.num_tokens - 1
        if params.max_tokens is not None:
            room = min(room, params.max_tokens - seq.num_output_tokens - 1)
        return min(self.config.num_speculative_tokens, room)

    def _lookup(self, seq: Sequence, k: int) -> list[int]:
        cfg = self.config
        drafts = propose_ngram(seq.token_ids, k, cfg.prompt_lookup_min, cfg.prompt_lookup_max)
        if not drafts and self.suffix_cache is not None:
            drafts = self.suffix_cache.propose(seq.token_ids, k)
        return drafts

    def finished(self, seq: Sequence) -> None:
        """A choice ended (not aborted): with method suffix its tokens serve later requests' drafts."""
        if self.suffix_cache is not None:
            self.suffix_cache.add(seq.token_ids)

    def snapshot(self) -> SpecDecodeCounters:
        s = self.stats
        return dataclasses.replace(s, num_accepted_tokens_per_pos=list(s.num_accepted_tokens_per_pos))

    def record(self, seq: Sequence, num_draft_tokens: int, num_accepted: int) -> None:
        """After a verification. A sequence whose drafts all failed stops drafting for a while (1, 2, 4, 8 steps
        after consecutive misses): free text matches by chance, and each failed guess costs a wider step."""
        if num_draft_tokens == 0:
            return
        if num_accepted == 0:
            seq.spec_backoff = min(max(1, 2 * seq.spec_backoff), MAX_BACKOFF_STEPS)
            seq.spec_skip_steps = seq.spec_backoff
        else:
            seq.spec_backoff = 0
        s = self.stats
        s.num_drafts += 1
        s.num_draft_tokens += num_draft_tokens
        s.num_accepted_tokens += num_accepted
        for pos in range(num_accepted):
            s.num_accepted_tokens_per_pos[pos] += 1

"""A request and its sequences (one per choice when ``n > 1``): the token state the scheduler moves around.

A sequence's tokens are its prompt followed by what it generated. The scheduler only ever asks how many of them
have their KV in the cache (``num_computed_tokens``): a fresh prompt, a chunked prefill, a decode step, a forked
choice that recomputes its partial last block, or a preempted sequence recomputing everything are all "compute
tokens ``[num_computed_tokens, num_tokens)``", and the step that reaches ``num_tokens`` samples the next token.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..outputs import FinishReason, RequestMetrics, TokenLogprob
from ..sampling_params import SamplingParams

if TYPE_CHECKING:
    import torch

    from ..detokenizer import IncrementalDetokenizer
    from ..structured_outputs import CompiledGrammar, GrammarState


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    seq_id: int
    request: Request
    index: int  # which of the request's n choices
    token_ids: list[int]
    num_prompt_tokens: int
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0  # tokens whose KV is in the cache
    block_table: list[int] = field(default_factory=list)
    num_hashed_blocks: int = 0  # leading blocks registered in the prefix cache
    # chained hash of each full block of token_ids (computed once per block; token ids only ever grow)
    token_block_hashes: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None  # per-choice RNG when the request has a seed
    detokenizer: IncrementalDetokenizer | None = None
    grammar: GrammarState | None = None  # structured outputs: this choice's matcher, advanced with each token
    grammar_active: bool = True  # False while the model still reasons (the grammar constrains only the answer)
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    finish_reported: bool = False
    # what the next RequestOutput delta reports for this choice
    pending_text: str = ""
    pending_token_ids: list[int] = field(default_factory=list)
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)
    num_preemptions: int = 0
    # speculative decoding: tokens guessed to follow token_ids, verified by the next step (never in token_ids)
    draft_token_ids: list[int] = field(default_factory=list)
    spec_backoff: int = 0  # steps without drafts after the next failed guess (doubles with each)
    spec_skip_steps: int = 0  # steps (with a draft at hand) still to skip

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def needs_prompt_logprobs(self) -> bool:
        """This choice's prefill must produce logits for prompt positions (choice 0 does it for the request)."""
        scored = self.request.prompt_logprobs
        return self.index == 0 and scored is not None and len(scored) < self.num_prompt_tokens

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def sort_key(self) -> tuple[int, int, int]:
        """Scheduling order: lower priority value first, then arrival, then choice index."""
        return (self.request.priority, self.request.arrival_index, self.index)

    def __repr__(self) -> str:
        return (
            f"Sequence({self.request.request_id}#{self.index}, {self.status.value}, "
            f"computed={self.num_computed_tokens}/{self.num_tokens}, blocks={len(self.block_table)})"
        )


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int
    arrival_index: int  # FCFS order among equal priorities
    metrics: RequestMetrics
    seqs: list[Sequence] = field(default_factory=list)
    grammar: CompiledGrammar | None = None  # structured outputs: each choice gets its own state of it
    # with a reasoning model: (prompt ids, output ids) -> has the reasoning ended? The grammar applies after it.
    reasoning_end: Callable[[list[int], list[int]], bool] | None = None
    is_forked: bool = False  # n > 1: the other choices were forked from choice 0 after its prefill
    # params.prompt_logprobs: entry j is prompt token j's (None for j = 0); grows as prefill chunks run
    prompt_logprobs: list[TokenLogprob | None] | None = None
    prompt_logprobs_reported: bool = False

    @property
    def is_finished(self) -> bool:
        return (self.is_forked or self.params.n == 1) and all(s.is_finished for s in self.seqs)

"""OutputProcessor: what happens to tokens once they are chosen.

    tokens of a step (one per sequence, or several with speculation)
      ─▶ append one at a time: grammar advance, stop rules (stop ids, EOS, stop strings, min_tokens, length)
      ─▶ the first token that finishes a choice ends its run (later tokens of that run are dropped)
      ─▶ finished choices leave the scheduler (their KV blocks are freed), finished requests leave the engine
      ─▶ one RequestOutput delta per request that progressed

Every rule is checked per token, so a run of accepted draft tokens stops exactly where one-token steps would.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from ..outputs import CompletionOutput, FinishReason, RequestOutput, TokenLogprob
from .scheduler import Scheduler
from .sequence import Request, Sequence

logger = logging.getLogger(__name__)


@dataclass
class TokenRun:
    """The tokens one sequence produced this step, in order (with their logprobs when the request asks)."""

    seq: Sequence
    token_ids: list[int]
    logprobs: list[TokenLogprob | None] = field(default_factory=list)


class OutputProcessor:
    def __init__(
        self,
        scheduler: Scheduler,
        requests: dict[str, Request],
        eos_token_ids: frozenset[int],
        max_seq_len: int,
    ) -> None:
        self.scheduler = scheduler
        self.requests = requests  # the engine's live requests: a finished one is removed from it
        self.eos_token_ids = eos_token_ids
        self.max_seq_len = max_seq_len

    def process(self, runs: list[TokenRun]) -> list[RequestOutput]:
        """Append each run's tokens (stopping at the first that finishes its choice); the deltas of the requests
        that progressed. Returns in request order of first appearance."""
        now = time.monotonic()
        touched: dict[str, Request] = {}
        for run in runs:
            seq = run.seq
            if seq.is_finished:  # aborted between schedule and now
                continue
            touched[seq.request.request_id] = seq.request
            self.append(seq, run.token_ids, run.logprobs, now)
        return self._emit(touched.values(), now)

    def append(self, seq: Sequence, token_ids: list[int], logprobs: list[TokenLogprob | None], now: float) -> int:
        """Append tokens to a running choice one at a time; returns how many were appended (fewer than given when
        one of them finished the choice)."""
        metrics = seq.request.metrics
        metrics.first_token_time = metrics.first_token_time or now
        for i, token_id in enumerate(token_ids):
            metrics.num_generation_tokens += 1
            seq.token_ids.append(token_id)
            seq.pending_token_ids.append(token_id)
            logprob = logprobs[i] if i < len(logprobs) else None
            if logprob is not None:
                seq.pending_logprobs.append(logprob)
            grammar_done = seq.grammar is not None and seq.grammar_active and self._advance_grammar(seq, token_id)
            self._check_stop(seq, token_id)
            if grammar_done and seq.finish_reason is None:
                seq.finish_reason = FinishReason.STOP  # the grammar accepted its stop token: the answer is complete
                self._flush(seq)
            if seq.finish_reason is not None:
                self.scheduler.remove(seq)
                return i + 1
        return len(token_ids)

    def _emit(self, requests: Iterable[Request], now: float) -> list[RequestOutput]:
        outputs = []
        for request in requests:
            finished = request.is_finished
            if finished:
                request.metrics.finished_time = now
                del self.requests[request.request_id]
            outputs.append(self.make_output(request, final=finished))
        return outputs

    def finish_scored(self, seqs: list[Sequence]) -> list[RequestOutput]:
        """Requests with max_tokens 0 whose prompts were scored: done, nothing sampled."""
        now = time.monotonic()
        outputs = []
        for seq in seqs:
            if seq.is_finished:  # aborted between schedule and now
                continue
            seq.finish_reason = FinishReason.LENGTH
            self.scheduler.remove(seq)
            request = seq.request
            request.metrics.finished_time = now
            del self.requests[request.request_id]
            outputs.append(self.make_output(request, final=True))
        return outputs

    def abort(self, request: Request) -> RequestOutput:
        """Stop every unfinished choice of a request (already taken out of the engine's requests)."""
        for seq in request.seqs:
            if not seq.is_finished:
                self.scheduler.remove(seq)
                seq.finish_reason = FinishReason.ABORT
                self._flush(seq)  # the text held back for a stop string
        request.metrics.finished_time = time.monotonic()
        return self.make_output(request, final=True)

    @staticmethod
    def _flush(seq: Sequence) -> None:
        if seq.detokenizer is not None:
            seq.pending_text += seq.detokenizer.flush()

    def _check_stop(self, seq: Sequence, token_id: int) -> None:
        params = seq.params
        num_output = seq.num_output_tokens
        can_stop = num_output >= params.min_tokens
        is_stop_id = can_stop and token_id in params.stop_token_ids
        is_eos = can_stop and token_id in self.eos_token_ids and not params.ignore_eos
        stop_string = None
        # a stop token's own text is dropped (vLLM), unless include_stop_str_in_output
        if seq.detokenizer is not None and (params.include_stop_str_in_output or not (is_stop_id or is_eos)):
            text, stop_string = seq.detokenizer.step([token_id])
            seq.pending_text += text
        if stop_string is not None:  # the detokenizer matches stop strings only from min_tokens on
            seq.finish_reason, seq.stop_reason = FinishReason.STOP, stop_string
            return
        if is_stop_id:
            seq.finish_reason, seq.stop_reason = FinishReason.STOP, token_id
        elif is_eos:
            seq.finish_reason = FinishReason.STOP
        elif (params.max_tokens is not None and num_output >= params.max_tokens) or seq.num_tokens >= self.max_seq_len:
            seq.finish_reason = FinishReason.LENGTH
        else:
            return
        self._flush(seq)

    @staticmethod
    def _advance_grammar(seq: Sequence, token_id: int) -> bool:
        """Feed the token to the choice's matcher; True when the grammar has terminated."""
        assert seq.grammar is not None
        if not seq.grammar.accept(token_id):
            # the bitmask allowed only tokens the matcher accepts: this is a bug, not a client error
            logger.error("grammar rejected token %d of %s: stopping the choice", token_id, seq)
            return True
        return seq.grammar.is_terminated()

    @staticmethod
    def make_output(request: Request, *, final: bool) -> RequestOutput:
        """The delta since the last output: choices with new tokens/text or a finish not yet reported (every
        choice on the final output)."""
        choices = []
        for seq in request.seqs:
            unreported_finish = seq.finish_reason is not None and not seq.finish_reported
            if not (final or seq.pending_token_ids or seq.pending_text or unreported_finish):
                continue
            choices.append(
                CompletionOutput(
                    index=seq.index,
                    text=seq.pending_text,
                    token_ids=seq.pending_token_ids,
                    logprobs=seq.pending_logprobs if seq.params.logprobs is not None else None,
                    finish_reason=seq.finish_reason,
                    stop_reason=seq.stop_reason,
                )
            )
            seq.pending_text, seq.pending_token_ids, seq.pending_logprobs = "", [], []
            seq.finish_reported = seq.finish_reason is not None
        out = RequestOutput(request.request_id, request.prompt_token_ids, choices, final, request.metrics)
        scored = request.prompt_logprobs
        if scored is not None and len(scored) == len(request.prompt_token_ids) and not request.prompt_logprobs_reported:
            out.prompt_logprobs = scored
            request.prompt_logprobs_reported = True
        return out

"""LLMEngine: the synchronous step loop.

    step():  schedule -> execute the model -> sample -> append tokens, check stops -> emit deltas

``add_request`` queues a prompt; each ``step`` returns one RequestOutput DELTA per request that progressed
(new text/tokens/logprobs per choice since the previous delta; ``finished`` on its last). ``LLM`` (offline)
and ``AsyncEngine`` (server) are thin drivers of this loop.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..config import EngineConfig, SchedulerConfig
from ..layers.sampler import Sampler, SamplingRow, score_tokens
from ..outputs import CompletionOutput, EngineStats, FinishReason, RequestMetrics, RequestOutput
from ..sampling_params import SamplingParams
from .block_manager import BlockManager
from .model_runner import ModelRunner, PromptLogits
from .scheduler import ScheduledSeq, Scheduler
from .sequence import Request, Sequence

if TYPE_CHECKING:
    from ..models.loader import LoadedModel
    from ..structured_outputs import CompiledGrammar, GrammarBackend, StructuredOutputsParams
    from ..tokenizer import Tokenizer

logger = logging.getLogger(__name__)


@dataclass
class StepStats:
    num_batched_tokens: int = 0
    num_generated_tokens: int = 0


class LLMEngine:
    def __init__(self, config: EngineConfig, loaded: LoadedModel | None = None) -> None:
        from ..models.loader import load_model

        self.config = config
        if loaded is None:
            loaded = load_model(config.model, load_format=config.load_format, revision=config.revision)
        if config.chat_template is not None and loaded.tokenizer is not None:
            loaded.tokenizer.chat_template = Path(config.chat_template).read_text()
        self.model_config = mc = loaded.config
        self.model_name = config.served_model_name or loaded.name
        self.tokenizer: Tokenizer | None = loaded.tokenizer
        self.generation_config = dict(loaded.generation_config)  # the model's sampling defaults, for the server
        self.max_model_len = config.max_model_len or mc.max_position_embeddings
        if self.max_model_len > mc.max_position_embeddings:
            raise ValueError(
                f"max_model_len ({self.max_model_len}) exceeds the model's max_position_embeddings "
                f"({mc.max_position_embeddings})"
            )
        # the device, dtype, weights and KV cache
        self.runner = ModelRunner(config, loaded, max_model_len=self.max_model_len)
        self.device, self.dtype, self.model = self.runner.device, self.runner.dtype, self.runner.model
        self.quantization = self.runner.quantization
        self.cache_config = self.runner.cache_config
        num_blocks = self.cache_config.num_blocks
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        # a sequence can never outgrow the whole cache
        self.max_seq_len = min(self.max_model_len, self.cache_config.num_slots)
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens, self.max_model_len),
            self.block_manager,
        )
        self.sampler = Sampler(config.seed)
        eos = set(mc.eos_token_ids)
        if self.tokenizer is not None:
            eos |= set(self.tokenizer.eos_token_ids)
        self.eos_token_ids = frozenset(eos)

        self.requests: dict[str, Request] = {}
        self._grammar_backend: GrammarBackend | None = None
        self._grammar_lock = threading.Lock()
        self._arrivals = itertools.count()
        self._seq_ids = itertools.count()
        self.last_step = StepStats()

    # ---- requests ---------------------------------------------------------------------------------------
    def tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("prompt is text, but this model has no tokenizer: pass token ids")
            return self.tokenizer.encode(prompt)
        return list(prompt)

    def validate_prompt(self, prompt_token_ids: list[int]) -> None:
        n = len(prompt_token_ids)
        if n == 0:
            raise ValueError("prompt is empty (it must contain at least one token)")
        if n >= self.max_model_len:
            raise ValueError(
                f"prompt has {n} tokens, but max_model_len is {self.max_model_len}: it must be shorter to leave "
                f"room for at least one generated token"
            )
        if n + 1 > self.cache_config.num_slots:
            raise ValueError(
                f"prompt has {n} tokens, but the KV cache holds only {self.cache_config.num_slots} tokens in all "
                f"({self.cache_config.num_blocks} blocks of {self.cache_config.block_size}): it can never run"
            )
        vocab_size = self.model_config.vocab_size
        bad = [t for t in prompt_token_ids if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"prompt token ids must be in [0, {vocab_size}), got {bad[:4]}")

    def validate_params(self, params: SamplingParams) -> None:
        """Token ids the request names exist; its bad words become token ids (idempotent). ValueError names the
        field."""
        params.verify_vocab(self.model_config.vocab_size)
        if params.bad_words and params.bad_words_token_ids is None:
            if self.tokenizer is None:
                raise ValueError("bad_words need a tokenizer, and this model has none")
            params.resolve_bad_words(self.tokenizer)

    def grammar_backend(self) -> GrammarBackend:
        """The grammar compiler for this model's vocabulary, built on first use (thread-safe)."""
        with self._grammar_lock:
            if self._grammar_backend is None:
                from ..structured_outputs import GrammarBackend

                if self.tokenizer is None:
                    raise ValueError("structured outputs need a tokenizer, and this model has none")
                self._grammar_backend = GrammarBackend(
                    self.tokenizer, self.model_config.vocab_size, stop_token_ids=sorted(self.eos_token_ids)
                )
            return self._grammar_backend

    def compile_grammar(self, params: StructuredOutputsParams) -> CompiledGrammar:
        """Compile (or fetch from the cache) a grammar; call it off the step loop. Raises GrammarError."""
        return self.grammar_backend().compile(params)

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        *,
        priority: int = 0,
        arrival_time: float | None = None,
        grammar: CompiledGrammar | None = None,
        reasoning_end: Callable[[list[int], list[int]], bool] | None = None,
    ) -> Request:
        """Queue a request. ``grammar``: ``params.structured_outputs`` compiled by the caller (off the step loop);
        when it is missing, the grammar is compiled here. ``reasoning_end``: the grammar waits until it is True."""
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        params = params or SamplingParams()
        prompt_token_ids = self.tokenize(prompt)
        self.validate_prompt(prompt_token_ids)
        self.validate_params(params)
        if grammar is None and params.structured_outputs is not None:
            grammar = self.compile_grammar(params.structured_outputs)
        metrics = RequestMetrics(arrival_time=arrival_time or time.monotonic(), num_prompt_tokens=len(prompt_token_ids))
        request = Request(request_id, prompt_token_ids, params, priority, next(self._arrivals), metrics)
        request.grammar = grammar
        request.reasoning_end = reasoning_end
        if params.prompt_logprobs is not None:
            request.prompt_logprobs = [None]  # the first token has nothing before it to score it
        seq = self._new_sequence(request, 0)
        seq.token_ids = list(prompt_token_ids)
        self.requests[request_id] = request
        self.scheduler.add(seq)
        return request

    def _new_sequence(self, request: Request, index: int) -> Sequence:
        params = request.params
        seq = Sequence(
            next(self._seq_ids), request, index, list(request.prompt_token_ids), len(request.prompt_token_ids)
        )
        if params.seed is not None:
            # each choice its own stream, so choices differ and each is reproducible on its own
            seed = params.seed if index == 0 else hash((params.seed, index)) & 0x7FFF_FFFF_FFFF_FFFF
            seq.generator = torch.Generator(device=self.device).manual_seed(seed)
        if self.tokenizer is not None:
            from ..detokenizer import IncrementalDetokenizer

            seq.detokenizer = IncrementalDetokenizer(
                self.tokenizer,
                request.prompt_token_ids,
                skip_special_tokens=params.skip_special_tokens,
                stop=params.stop,
                include_stop_str_in_output=params.include_stop_str_in_output,
                min_tokens=params.min_tokens,
            )
        if request.grammar is not None:
            # a forked choice starts where choice 0 started (no token sampled yet): a fresh state is its state
            seq.grammar = request.grammar.new_state()
            seq.grammar_active = request.reasoning_end is None
        request.seqs.append(seq)
        return seq

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and free its KV blocks; returns its final delta (None if unknown / done)."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        for seq in request.seqs:
            if not seq.is_finished:
                self.scheduler.remove(seq)
                seq.finish_reason = FinishReason.ABORT
                if seq.detokenizer is not None:
                    seq.pending_text += seq.detokenizer.flush()  # the text held back for a stop string
        request.metrics.finished_time = time.monotonic()
        return self._make_output(request, final=True)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # ---- the step loop ----------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        if batch.is_empty:
            return []
        out = self.runner.execute(batch)
        self.scheduler.update_computed(batch)
        for scored in out.prompt_logits:
            self._score_prompt(scored)
        logits, sampling = out.logits, out.sampling
        outputs: list[RequestOutput] = []
        if any(s.seq.params.max_tokens == 0 for s in sampling):  # prompts scored only: done, nothing to sample
            keep = [i for i, s in enumerate(sampling) if s.seq.params.max_tokens != 0]
            outputs = self._finish_scored([s.seq for s in sampling if s.seq.params.max_tokens == 0])
            logits, sampling = logits[keep], [sampling[i] for i in keep]
        rows, seqs = self._fork_choices(sampling)
        self.last_step = StepStats(batch.num_batched_tokens, len(seqs))
        if not seqs:
            return outputs
        sampled = self.sampler(logits[rows] if len(rows) != len(sampling) else logits, [self._row(s) for s in seqs])
        return outputs + self._append_tokens(seqs, sampled.token_ids, sampled.logprobs)

    def _score_prompt(self, scored: PromptLogits) -> None:
        """Log-probabilities of the prompt tokens these logits predict, appended to the request's."""
        seq = scored.scheduled.seq
        into = seq.request.prompt_logprobs
        assert into is not None and len(into) == scored.start + 1, (seq, scored.start)
        targets = seq.token_ids[scored.start + 1 : scored.start + 1 + len(scored.logits)]
        into.extend(score_tokens(scored.logits, targets, seq.params.prompt_logprobs or 0))

    def _finish_scored(self, seqs: list[Sequence]) -> list[RequestOutput]:
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
            outputs.append(self._make_output(request, final=True))
        return outputs

    def _fork_choices(self, sampling: list[ScheduledSeq]) -> tuple[list[int], list[Sequence]]:
        """n > 1: when choice 0 finishes its prompt, the other choices start from its KV blocks and sample their
        first token from the same logits row."""
        rows: list[int] = []
        seqs: list[Sequence] = []
        for row, s in enumerate(sampling):
            rows.append(row)
            seqs.append(s.seq)
            request = s.seq.request
            if request.params.n > 1 and not request.is_forked:
                request.is_forked = True
                for index in range(1, request.params.n):
                    child = self._new_sequence(request, index)
                    if self.scheduler.num_running < self.config.max_num_seqs:
                        self.block_manager.fork(s.seq, child)
                        self.scheduler.add_running(child)
                    else:  # no room to run: it waits, and is recomputed from the prefix cache when admitted
                        self.scheduler.add(child)
                    rows.append(row)
                    seqs.append(child)
        return rows, seqs

    def _row(self, seq: Sequence) -> SamplingRow:
        if seq.grammar is not None and not seq.grammar_active:
            end = seq.request.reasoning_end
            assert end is not None
            seq.grammar_active = end(seq.token_ids[: seq.num_prompt_tokens], seq.token_ids[seq.num_prompt_tokens :])
        return SamplingRow(
            seq.params,
            seq.token_ids[: seq.num_prompt_tokens],
            seq.token_ids[seq.num_prompt_tokens :],
            seq.generator,
            self.eos_token_ids,
            grammar=seq.grammar if seq.grammar_active else None,
        )

    def _append_tokens(self, seqs: list[Sequence], token_ids: list[int], logprobs: list) -> list[RequestOutput]:
        now = time.monotonic()
        touched: dict[str, Request] = {}
        for seq, token_id, logprob in zip(seqs, token_ids, logprobs, strict=True):
            request = seq.request
            if seq.is_finished:  # aborted between schedule and now
                continue
            touched[request.request_id] = request
            metrics = request.metrics
            metrics.first_token_time = metrics.first_token_time or now
            metrics.num_generation_tokens += 1
            seq.token_ids.append(token_id)
            seq.pending_token_ids.append(token_id)
            if logprob is not None:
                seq.pending_logprobs.append(logprob)
            grammar_done = seq.grammar is not None and seq.grammar_active and self._advance_grammar(seq, token_id)
            self._check_stop(seq, token_id)
            if grammar_done and seq.finish_reason is None:
                seq.finish_reason = FinishReason.STOP  # the grammar accepted its stop token: the answer is complete
                if seq.detokenizer is not None:
                    seq.pending_text += seq.detokenizer.flush()
            if seq.finish_reason is not None:
                self.scheduler.remove(seq)
        outputs = []
        for request in touched.values():
            finished = request.is_finished
            if finished:
                request.metrics.finished_time = now
                del self.requests[request.request_id]
            outputs.append(self._make_output(request, final=finished))
        return outputs

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
        if seq.detokenizer is not None:
            seq.pending_text += seq.detokenizer.flush()

    @staticmethod
    def _advance_grammar(seq: Sequence, token_id: int) -> bool:
        """Feed the sampled token to the choice's matcher; True when the grammar has terminated."""
        assert seq.grammar is not None
        if not seq.grammar.accept(token_id):
            # the bitmask allowed only tokens the matcher accepts: this is a bug, not a client error
            logger.error("grammar rejected token %d of %s: stopping the choice", token_id, seq)
            return True
        return seq.grammar.is_terminated()

    def _make_output(self, request: Request, *, final: bool) -> RequestOutput:
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

    # ---- introspection ----------------------------------------------------------------------------------
    def stats(self) -> EngineStats:
        bm = self.block_manager
        return EngineStats(
            num_requests_waiting=self.scheduler.num_waiting,
            num_requests_running=self.scheduler.num_running,
            kv_cache_usage=bm.usage,
            num_gpu_blocks=bm.num_blocks,
            block_size=bm.block_size,
            num_preemptions=self.scheduler.num_preemptions,
            prefix_cache_queries=bm.prefix_cache_queries,
            prefix_cache_hits=bm.prefix_cache_hits,
        )

    def abort_all(self) -> list[RequestOutput]:
        outputs = []
        for request_id in list(self.requests):
            with contextlib.suppress(KeyError):
                out = self.abort_request(request_id)
                if out is not None:
                    outputs.append(out)
        return outputs

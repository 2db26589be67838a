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
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..config import EngineConfig, SchedulerConfig
from ..layers.sampler import Sampler, SamplingRow, score_tokens
from ..outputs import EngineStats, FinishReason, RequestMetrics, RequestOutput
from ..sampling_params import SamplingParams
from ..spec_decode.config import SpeculativeConfig
from ..spec_decode.draft_model import DraftModel, load_draft_model
from ..spec_decode.speculator import Speculator
from ..spec_decode.verify import RowGroup, accepted_length, verification_rows
from .block_manager import BlockManager
from .model_runner import ModelRunner, PromptLogits
from .output_processor import OutputProcessor, TokenRun
from .scheduler import ScheduledSeq, Scheduler
from .sequence import Request, Sequence

if TYPE_CHECKING:
    from ..models.loader import LoadedModel
    from ..structured_outputs import CompiledGrammar, GrammarBackend, StructuredOutputsParams
    from ..tokenizer import Tokenizer

logger = logging.getLogger(__name__)


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
        self.max_model_len = config.resolve_max_model_len(mc.max_position_embeddings)
        spec = None if config.speculative_config is None else SpeculativeConfig.from_dict(config.speculative_config)
        draft = None
        if spec is not None and spec.method == "draft_model":
            draft = load_draft_model(spec, config, loaded, self.max_model_len)  # refused early: before the target
        # the device, dtype, weights and KV cache (shared with the draft model's)
        self.runner = ModelRunner(
            config, loaded, max_model_len=self.max_model_len, draft_model_config=None if draft is None else draft.config
        )
        self.device, self.dtype, self.model = self.runner.device, self.runner.dtype, self.runner.model
        self.quantization = self.runner.quantization
        self.cache_config = self.runner.cache_config
        num_blocks = self.cache_config.num_blocks
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        # a sequence can never outgrow the whole cache
        self.max_seq_len = min(self.max_model_len, self.cache_config.num_slots)
        self.speculator: Speculator | None = None
        if spec is not None:
            draft_model = None
            if draft is not None:
                draft_model = DraftModel(
                    config, draft, num_blocks=num_blocks, max_model_len=self.max_model_len, vocab_size=mc.vocab_size
                )
            self.speculator = Speculator(spec, self.max_seq_len, draft_model)
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens, self.max_model_len),
            self.block_manager,
            on_free=None if self.speculator is None else self.speculator.release,
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
        self.output_processor = OutputProcessor(self.scheduler, self.requests, self.eos_token_ids, self.max_seq_len)

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
        return self.output_processor.abort(request)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # ---- the step loop ----------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        if self.speculator is not None:
            self.speculator.propose(self.scheduler.running)
        batch = self.scheduler.schedule()
        if batch.is_empty:
            return []
        out = self.runner.execute(batch)
        self.scheduler.update_computed(batch)
        for scored in out.prompt_logits:
            self._score_prompt(scored)
        # prompts scored only (max_tokens 0) are done: nothing to sample
        scored_only = [s.seq for s in out.sampling if s.seq.params.max_tokens == 0]
        outputs = self.output_processor.finish_scored(scored_only) if scored_only else []
        groups = self._fork_choices(out.sampling)
        if not groups:
            return outputs
        rows: list[int] = []
        sampling_rows: list[SamplingRow] = []
        for group in groups:
            rows.extend(range(group.first_row, group.first_row + 1 + len(group.drafts)))
            sampling_rows.extend(verification_rows(self._row(group.seq), group.drafts))
        logits = out.logits if rows == list(range(len(out.logits))) else out.logits[rows]
        sampled = self.sampler(logits, sampling_rows)
        runs: list[TokenRun] = []
        row = 0
        for group in groups:
            k = len(group.drafts)
            num_accepted = accepted_length(sampled.accepted[row : row + k])
            end = row + num_accepted + 1  # the accepted drafts, then the token sampled after them
            runs.append(TokenRun(group.seq, sampled.token_ids[row:end], sampled.logprobs[row:end]))
            if k and self.speculator is not None:
                self.speculator.record(group.seq, k, num_accepted)
            row += k + 1
        outputs += self.output_processor.process(runs)
        for run in runs:
            if run.seq.is_finished:
                if self.speculator is not None and run.seq.finish_reason is not FinishReason.ABORT:
                    self.speculator.finished(run.seq)
            elif len(run.token_ids) > 1:
                self.block_manager.accept_drafts(run.seq, len(run.token_ids) - 1)
        return outputs

    def _score_prompt(self, scored: PromptLogits) -> None:
        """Log-probabilities of the prompt tokens these logits predict, appended to the request's."""
        seq = scored.scheduled.seq
        into = seq.request.prompt_logprobs
        assert into is not None and len(into) == scored.start + 1, (seq, scored.start)
        targets = seq.token_ids[scored.start + 1 : scored.start + 1 + len(scored.logits)]
        into.extend(score_tokens(scored.logits, targets, seq.params.prompt_logprobs or 0))

    def _fork_choices(self, sampling: list[ScheduledSeq]) -> list[RowGroup]:
        """The sequences that sample this step with their logits rows. n > 1: when choice 0 finishes its prompt,
        the other choices start from its KV blocks and sample their first token from the same logits row."""
        groups: list[RowGroup] = []
        first_row = 0
        for s in sampling:
            row, first_row = first_row, first_row + s.num_sample_rows
            if s.seq.params.max_tokens == 0:
                continue
            groups.append(RowGroup(s.seq, row, s.draft_token_ids))
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
                    groups.append(RowGroup(child, row, []))
        return groups

    def _row(self, seq: Sequence) -> SamplingRow:
        if seq.grammar is not None and not seq.grammar_active:
            end = seq.request.reasoning_end
            assert end is not None
            seq.grammar_active = end(seq.request.prompt_token_ids, seq.output_token_ids)
        return SamplingRow(
            seq.params,
            seq.request.prompt_token_ids,
            seq.output_token_ids,
            seq.generator,
            self.eos_token_ids,
            grammar=seq.grammar if seq.grammar_active else None,
        )

    # ---- introspection ----------------------------------------------------------------------------------
    def stats(self) -> EngineStats:
        bm = self.block_manager
        return EngineStats(
            num_requests_waiting=self.scheduler.num_waiting,
            num_requests_running=self.scheduler.num_running,
            kv_cache_usage=bm.usage,
            num_gpu_blocks=bm.num_blocks,
            block_size=bm.block_size,
            cache_dtype=self.cache_config.cache_dtype,
            num_preemptions=self.scheduler.num_preemptions,
            prefix_cache_queries=bm.prefix_cache_queries,
            prefix_cache_hits=bm.prefix_cache_hits,
            spec_decode=self.speculator.snapshot() if self.speculator is not None else None,
        )

    def abort_all(self) -> list[RequestOutput]:
        outputs = []
        for request_id in list(self.requests):
            with contextlib.suppress(KeyError):
                out = self.abort_request(request_id)
                if out is not None:
                    outputs.append(out)
        return outputs

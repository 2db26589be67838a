"""What the engine hands back: per-request outputs (deltas when streaming) and engine-wide stats."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class FinishReason(enum.StrEnum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens, or the model's context is full
    ABORT = "abort"  # cancelled by the client (or the server on shutdown)


@dataclass
class TokenLogprob:
    """A token's log-probability and the top alternatives: for a sampled token after penalties, before sampling;
    for a prompt token the model's raw distribution (with the token's ``rank`` in it, 1 = the most likely)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # [(token_id, logprob)] best first
    rank: int | None = None


@dataclass
class CompletionOutput:
    """One of the ``n`` continuations of a request.

    From ``LLM.generate`` these are cumulative. From ``AsyncEngine.add_request`` each yielded output
    is a delta: the text, tokens and logprobs added since the previous yield.
    """

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None  # the stop string or stop token id that matched, if any

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    """Wall-clock timestamps (time.monotonic()) and token counts for one request."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    num_prompt_tokens: int = 0
    num_generation_tokens: int = 0  # summed over the n choices
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    num_preemptions: int = 0


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    # SamplingParams.prompt_logprobs: one per prompt token (None for the first), on the first output that has them
    prompt_logprobs: list[TokenLogprob | None] | None = None


@dataclass
class EngineStats:
    """A snapshot for /metrics and the autoscaler. Counters are totals since start."""

    num_requests_waiting: int
    num_requests_running: int
    kv_cache_usage: float  # used blocks / total blocks, in [0, 1]
    num_gpu_blocks: int  # total KV blocks (named as vLLM names it, whatever the device)
    block_size: int
    cache_dtype: str = "auto"  # the --kv-cache-dtype setting (vLLM's cache_config_info label)
    num_preemptions: int = 0
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int = 0  # of those, tokens found
    # speculative decoding (None when it is off): vLLM's vllm:spec_decode_* counters
    spec_decode: SpecDecodeCounters | None = None


@dataclass
class SpecDecodeCounters:
    num_drafts: int = 0  # sequence-steps that verified at least one draft token
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_accepted_tokens_per_pos: list[int] = field(default_factory=list)  # [num_speculative_tokens]

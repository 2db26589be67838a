"""Engine streams as the server sees them: one request's trace, the fan-in of several streams, choice accumulators.

One HTTP request becomes one engine request per prompt; each engine request carries ``n`` choices. The fan-in
merges their delta streams into ``(choice index, delta)`` pairs, choice ``j`` of prompt ``i`` being
``i * n + j``, in the order the deltas arrive.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from typing import Any, cast

from ..outputs import CompletionOutput, RequestOutput, TokenLogprob
from . import protocol as p
from .errors import bad_request


@dataclass
class Trace:
    """One HTTP request's timings and token counts: fed to the metrics and to its log line."""

    arrival: float = field(default_factory=time.monotonic)
    first_token: float | None = None
    last_token: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reasons: list[str] = field(default_factory=list)
    cached_tokens: dict[str, int] = field(default_factory=dict)  # engine request id -> prefix-cache hit tokens
    # prompt index -> its prompt logprobs (SamplingParams.prompt_logprobs), once the engine has scored it
    prompt_logprobs: dict[int, list[TokenLogprob | None]] = field(default_factory=dict)

    def to_log(self) -> dict[str, Any]:
        ttft = None if self.first_token is None else round(self.first_token - self.arrival, 4)
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "ttft_s": ttft,
            "finish_reason": ",".join(sorted(set(self.finish_reasons))) or None,
        }

    def usage(self) -> p.UsageInfo:
        return p.UsageInfo(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            total_tokens=self.prompt_tokens + self.completion_tokens,
            prompt_tokens_details=p.PromptTokensDetails(cached_tokens=sum(self.cached_tokens.values())),
        )


@dataclass(frozen=True)
class StreamUsage:
    """Where a stream carries usage: only on a last, choice-less chunk (``stream_options.include_usage``), or the
    counts so far on every chunk (vLLM's ``continuous_usage_stats``, with include_usage)."""

    include: bool = False
    continuous: bool = False

    @classmethod
    def of(cls, options: p.StreamOptions | None) -> StreamUsage:
        include = bool(options and options.include_usage)
        return cls(include, include and bool(options and options.continuous_usage_stats))

    def stamp(self, chunk: p.ChatCompletionChunk | p.CompletionChunk, trace: Trace) -> None:
        """The choice-less last chunk (sent only with include_usage): the totals. A chunk with choices: the counts
        so far when continuous; else null, serialized only with include_usage (assigned, not left unset, so that
        it is)."""
        if self.continuous or (self.include and not chunk.choices):
            chunk.usage = trace.usage()
        elif self.include:
            chunk.usage = None


@dataclass
class Choice:
    """A choice being accumulated from deltas, for non-streaming answers."""

    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: p.FinishReasonName | None = None
    stop_reason: str | int | None = None

    def add(self, delta: CompletionOutput) -> None:
        self.text.append(delta.text)
        self.token_ids.extend(delta.token_ids)
        if delta.logprobs:
            self.logprobs.extend(delta.logprobs)
        if delta.finish_reason is not None:
            self.finish_reason = finish_reason(delta)
            self.stop_reason = delta.stop_reason


def finish_reason(c: CompletionOutput) -> p.FinishReasonName | None:
    if c.finish_reason is None:
        return None
    return cast(p.FinishReasonName, str(getattr(c.finish_reason, "value", c.finish_reason)))


async def aclose(stream: Any) -> None:
    close = getattr(stream, "aclose", None)
    if close is not None:
        with contextlib.suppress(Exception):
            await close()


async def refusals_as_400(stream: AsyncIterator[RequestOutput]) -> AsyncGenerator[RequestOutput, None]:
    """The engine's stream, with a lazily raised ``ValueError`` (a prompt it refuses) turned into a 400."""
    try:
        async for out in stream:
            yield out
    except ValueError as exc:
        raise bad_request(str(exc), param="prompt") from None
    finally:
        await aclose(stream)


async def merge(streams: list[AsyncIterator[RequestOutput]]) -> AsyncGenerator[tuple[int, RequestOutput], None]:
    """(stream index, output) from all streams as they come; closing this closes every stream."""
    if len(streams) == 1:
        try:
            async for out in streams[0]:
                yield 0, out
        finally:
            await aclose(streams[0])
        return
    queue: asyncio.Queue[tuple[int, RequestOutput] | BaseException | None] = asyncio.Queue()

    async def pump(i: int) -> None:
        try:
            async for out in streams[i]:
                queue.put_nowait((i, out))
        except Exception as exc:
            queue.put_nowait(exc)
        finally:
            await aclose(streams[i])
            queue.put_nowait(None)

    tasks = [asyncio.create_task(pump(i)) for i in range(len(streams))]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is None:
                remaining -= 1
                continue
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

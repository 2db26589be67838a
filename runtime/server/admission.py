"""Admission: the one path every generation request passes (HTTP completions, HTTP chat, WebSocket chat).

admit(caller, request_ids, trace)
  ─▶ draining? 503 ─▶ queue bound (engine's waiting + ours not yet running) 429 ─▶ per-key rate limit 429
  ─▶ count in flight (for the drain) ─▶ ... the request runs ...
  ─▶ finally: charge the generated tokens to the caller's token bucket, uncount
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator

from kubellm.ratelimit import RateLimiter

from ..outputs import EngineStats
from .errors import APIError
from .metrics import ServerMetrics
from .streams import Trace

log = logging.getLogger("kubellm.server")


class Admission:
    """Bounded queue, rate limits, and the count of engine requests in flight (the drain waits for it)."""

    def __init__(
        self,
        max_queue_len: int,
        rate_limiter: RateLimiter,
        metrics: ServerMetrics,
        stats: Callable[[], EngineStats],
    ) -> None:
        self.max_queue_len = max_queue_len
        self.rate_limiter = rate_limiter
        self.metrics = metrics
        self._stats = stats
        self.draining = False
        self.in_flight = 0  # engine requests admitted and not finished
        self.active: set[str] = set()  # their engine request ids, to abort at the end of a drain
        self._idle = asyncio.Event()
        self._idle.set()

    def start_draining(self) -> None:
        if not self.draining:
            log.info("draining: %d requests in flight", self.in_flight)
        self.draining = True

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is in flight; False if the timeout passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def check_draining(self) -> None:
        if self.draining:
            raise APIError(503, "the server is shutting down", code="draining")

    @contextlib.contextmanager
    def admit(self, caller: str, request_ids: list[str], trace: Trace) -> Iterator[None]:
        """Admit ``request_ids`` (one HTTP request's engine requests) or raise a 503 / 429; charge at the end."""
        self.check_draining()
        stats = self._stats()
        waiting = max(stats.num_requests_waiting, self.in_flight - stats.num_requests_running)
        if waiting + len(request_ids) > self.max_queue_len:
            raise APIError(
                429,
                f"the server is busy: {waiting} requests are waiting (limit {self.max_queue_len}); retry later",
                code="queue_full",
                headers={"Retry-After": "1"},
            )
        retry_after = self.rate_limiter.try_acquire(caller, trace.prompt_tokens)
        if retry_after is not None:
            raise APIError(
                429,
                f"rate limit exceeded for this API key; retry in {retry_after:.0f} s",
                code="rate_limit_exceeded",
                headers={"Retry-After": f"{retry_after:.0f}"},
            )
        self.metrics.prompt_tokens.inc(trace.prompt_tokens)
        self.in_flight += len(request_ids)
        self.active.update(request_ids)
        self._idle.clear()
        try:
            yield
        finally:
            self.rate_limiter.charge(caller, trace.completion_tokens)
            self.in_flight -= len(request_ids)
            self.active.difference_update(request_ids)
            if self.in_flight == 0:
                self._idle.set()

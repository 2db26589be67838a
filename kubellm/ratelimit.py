"""Per-caller rate limits (the runtime's server and the gateway): requests per minute and tokens per minute, over a
sliding 60-second window.

A request is admitted when the caller's usage over the last minute is under both limits. Its prompt tokens
are charged on admission and its generated tokens when it finishes, so a long generation counts against
the minute it ends in. A refused request learns from ``retry_after`` when the window frees enough room.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

WINDOW_S = 60.0


@dataclass
class _Usage:
    requests: deque[float] = field(default_factory=deque)  # admission times
    tokens: deque[tuple[float, int]] = field(default_factory=deque)  # (time, tokens)
    token_sum: int = 0


class RateLimiter:
    """Sliding-window limits per caller; a limit of None or 0 is off."""

    def __init__(
        self,
        requests_per_minute: int | None = None,
        tokens_per_minute: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rpm = requests_per_minute or None
        self.tpm = tokens_per_minute or None
        self._clock = clock
        self._usage: dict[str, _Usage] = {}

    @property
    def enabled(self) -> bool:
        return self.rpm is not None or self.tpm is not None

    def _expire(self, usage: _Usage, now: float) -> None:
        horizon = now - WINDOW_S
        while usage.requests and usage.requests[0] <= horizon:
            usage.requests.popleft()
        while usage.tokens and usage.tokens[0][0] <= horizon:
            usage.token_sum -= usage.tokens.popleft()[1]

    def try_acquire(self, caller: str, prompt_tokens: int) -> float | None:
        """Admit one request (charging its prompt tokens) and return None, or return seconds to wait."""
        if not self.enabled:
            return None
        now = self._clock()
        usage = self._usage.setdefault(caller, _Usage())
        self._expire(usage, now)
        waits: list[float] = []
        if self.rpm is not None and len(usage.requests) >= self.rpm:
            waits.append(usage.requests[len(usage.requests) - self.rpm] + WINDOW_S - now)
        if self.tpm is not None and usage.token_sum >= self.tpm:
            # Wait until enough old entries expire to bring the sum under the limit.
            excess = usage.token_sum - self.tpm + 1
            for t, n in usage.tokens:
                excess -= n
                if excess <= 0:
                    waits.append(t + WINDOW_S - now)
                    break
        if waits:
            return max(1.0, math.ceil(max(waits)))
        usage.requests.append(now)
        self.charge(caller, prompt_tokens)
        return None

    def charge(self, caller: str, tokens: int) -> None:
        if self.tpm is None or tokens <= 0:
            return
        usage = self._usage.setdefault(caller, _Usage())
        usage.tokens.append((self._clock(), tokens))
        usage.token_sum += tokens

"""Reconciles before status refreshes: what a user asked for (a Deployment, its Service) is created before the
operator reports on what exists.

Under a burst (hundreds of LLMDeployments applied at once, a GitOps sync) every object's Deployment events and the
fleet loop's tick each want a status write, several per object, and they compete with the reconciles for the API
server. A status refresh therefore waits, up to a bound, until no reconcile is in flight; it then reads the state as
it is by then, so the wait costs freshness of nothing but the status itself. A reconcile's own status write (its
observedGeneration and verdict) waits the same way, once its objects are applied.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

# A refresh never waits longer than this for the reconciles: a status may lag a burst, not go stale under one.
REFRESH_WAIT_SECONDS = 10.0


class WritePriority:
    def __init__(self) -> None:
        self._reconciling = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def reconciling(self) -> int:
        return self._reconciling

    @contextlib.asynccontextmanager
    async def reconcile(self) -> AsyncIterator[None]:
        self._reconciling += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._reconciling -= 1
            if self._reconciling == 0:
                self._idle.set()

    async def refresh_turn(self, max_wait: float = REFRESH_WAIT_SECONDS) -> None:
        """Return once no reconcile is in flight, or after ``max_wait`` seconds."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), max_wait)

"""Requests held for a model with no ready replica: a bounded count per model, exported as a gauge, and the wake
write (the annotation the operator turns into 0 -> 1 replicas), at most once per model per wake interval."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

from kubellm import contract
from kubellm.gateway.discovery import Model
from kubellm.gateway.errors import GatewayError
from kubellm.gateway.kube import Kube
from kubellm.gateway.metrics import GatewayMetrics

log = logging.getLogger("kubellm.gateway.hold")


class Holds:
    def __init__(self, metrics: GatewayMetrics, max_per_model: int, retry_after: int) -> None:
        self.metrics = metrics
        self.max_per_model = max_per_model
        self.retry_after = retry_after
        self.counts: dict[tuple[str, str], int] = {}

    @contextmanager
    def hold(self, model: Model) -> Iterator[None]:
        """Count one held request for the block's duration; GatewayError 429 if the model's queue is full."""
        count = self.counts.get(model.key, 0)
        if count >= self.max_per_model:
            self.metrics.rejected.labels(model.served_name, "queue_full").inc()
            raise GatewayError(
                429,
                f"{count} requests are already waiting for model {model.served_name!r} to start; retry later",
                code="queue_full",
                headers={"Retry-After": str(self.retry_after)},
            )
        gauge = self.metrics.held.labels(model.namespace, model.name, model.served_name)
        self.counts[model.key] = count + 1
        gauge.inc()
        try:
            yield
        finally:
            self.counts[model.key] -= 1
            gauge.dec()
            if not self.counts[model.key]:
                del self.counts[model.key]

    def total(self) -> int:
        return sum(self.counts.values())


class Waker:
    """Writes the wake annotation for a model at zero, with the count of requests held for it by then: the write
    waits `gather_seconds` after the first held request, so that a burst arriving together is counted in it (the
    operator sizes the wake by it). At most one write per model per `interval`."""

    def __init__(
        self, kube: Kube | None, metrics: GatewayMetrics, holds: Holds, interval: float, gather_seconds: float
    ) -> None:
        self.kube, self.metrics, self.holds = kube, metrics, holds
        self.interval, self.gather_seconds = interval, gather_seconds
        self._last: dict[tuple[str, str], float] = {}
        self._writes: set[asyncio.Task[None]] = set()

    async def wake(self, model: Model) -> None:
        """Wake a model at zero replicas (none set yet, none written lately); returns at once, the write follows."""
        if model.replicas > 0 or model.waking or self.kube is None:
            return
        now = time.monotonic()
        if now - self._last.get(model.key, -float("inf")) < self.interval:
            return
        self._last[model.key] = now
        task = asyncio.create_task(self._write(model))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _write(self, model: Model) -> None:
        assert self.kube is not None
        await asyncio.sleep(self.gather_seconds)
        held = self.holds.counts.get(model.key, 0)
        path = (
            f"/apis/{contract.LLMD_GROUP}/{contract.LLMD_VERSION}/namespaces/{model.namespace}/{contract.LLMD_PLURAL}"
        )
        stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        annotations = {contract.ANNOTATION_WAKE: stamp, contract.ANNOTATION_WAKE_HELD: str(held)}
        try:
            await self.kube.merge_patch(f"{path}/{model.name}", {"metadata": {"annotations": annotations}})
        except Exception as exc:  # the next held request (past the interval) tries again
            log.warning("waking %s/%s failed: %s", model.namespace, model.name, exc)
            return
        self.metrics.wakes.labels(model.served_name).inc()
        log.info("woke %s/%s (model %s): %d requests held", model.namespace, model.name, model.served_name, held)

    async def close(self) -> None:
        for task in list(self._writes):
            task.cancel()
        await asyncio.gather(*self._writes, return_exceptions=True)

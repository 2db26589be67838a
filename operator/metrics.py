"""Scrape the runtime pods' Prometheus /metrics: concurrently, each with a timeout, a global cap on scrapes in flight.

The text is parsed with prometheus_client's own parser; the vLLM-named gauges are summed over their
`model_name` labels (one runtime may serve a model under several names).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from dataclasses import dataclass

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from kubellm.operator import constants as c
from kubellm.operator.autoscaler import PodMetrics


class MetricsError(ValueError):
    """A /metrics page that cannot be used (missing gauges, unparsable text)."""


@dataclass(frozen=True)
class ScrapeTarget:
    pod: str
    url: str


@dataclass(frozen=True)
class ScrapeResult:
    samples: tuple[PodMetrics, ...]
    failures: tuple[tuple[str, str], ...]  # (pod, why)


def parse_metrics(pod: str, text: str) -> PodMetrics:
    totals = {c.METRIC_WAITING: 0.0, c.METRIC_RUNNING: 0.0, c.METRIC_KV_USAGE: 0.0}
    seen: set[str] = set()
    kv_series = 0
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name in totals:
                    if math.isnan(sample.value):
                        continue
                    totals[sample.name] += sample.value
                    seen.add(sample.name)
                    kv_series += sample.name == c.METRIC_KV_USAGE
    except ValueError as exc:
        raise MetricsError(f"unparsable metrics: {exc}") from exc
    missing = sorted(set(totals) - seen)
    if missing:
        raise MetricsError(f"missing {', '.join(missing)}")
    return PodMetrics(
        pod=pod,
        num_requests_waiting=totals[c.METRIC_WAITING],
        num_requests_running=totals[c.METRIC_RUNNING],
        # Usage is a fraction per engine: average it when several model names report it.
        kv_cache_usage=min(1.0, max(0.0, totals[c.METRIC_KV_USAGE] / max(kv_series, 1))),
    )


class Scraper:
    """One per operator process: a shared HTTP session and the global concurrency cap."""

    def __init__(self, *, timeout_seconds: float, concurrency: int) -> None:
        self._timeout = aiohttp.ClientTimeout(total=timeout_seconds)
        self._semaphore = asyncio.Semaphore(concurrency)
        self._session: aiohttp.ClientSession | None = None

    async def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def scrape_one(self, target: ScrapeTarget) -> PodMetrics:
        session = await self._get_session()
        async with self._semaphore, session.get(target.url) as response:
            if response.status != 200:
                raise MetricsError(f"HTTP {response.status}")
            return parse_metrics(target.pod, await response.text())

    async def scrape(self, targets: Sequence[ScrapeTarget]) -> ScrapeResult:
        results = await asyncio.gather(*(self.scrape_one(t) for t in targets), return_exceptions=True)
        samples: list[PodMetrics] = []
        failures: list[tuple[str, str]] = []
        for target, result in zip(targets, results, strict=True):
            if isinstance(result, PodMetrics):
                samples.append(result)
            elif isinstance(result, asyncio.TimeoutError | TimeoutError):
                failures.append((target.pod, "timed out"))
            elif isinstance(result, Exception):
                failures.append((target.pod, f"{type(result).__name__}: {result}"))
            else:  # a BaseException (cancellation) is not ours to swallow
                raise result
        return ScrapeResult(tuple(samples), tuple(failures))


def metrics_url(pod_ip: str, port: int = c.CONTAINER_PORT) -> str:
    host = f"[{pod_ip}]" if ":" in pod_ip else pod_ip
    return f"http://{host}:{port}{c.METRICS_PATH}"

"""The runtimes' own load, scraped from each ready endpoint's /metrics every `interval` seconds: the vLLM gauges
`vllm:num_requests_waiting` (summed over model names) and `vllm:kv_cache_usage_perc` (averaged). A reading older
than three intervals is dropped: a replica that stops answering counts by the gateway's in-flight count alone."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import aiohttp

from kubellm import contract
from kubellm.gateway.discovery import Endpoint

log = logging.getLogger("kubellm.gateway.scrape")


@dataclass(frozen=True)
class RuntimeLoad:
    waiting: float
    kv_usage: float
    at: float  # time.monotonic()


def samples(text: str, names: tuple[str, ...]) -> Iterator[tuple[str, float]]:
    """(name, value) of every sample of the metrics `names` in Prometheus' text format, the other lines skipped
    unparsed: a runtime's /metrics is mostly histogram buckets the gateway never reads, and prometheus_client's
    parser spent ~2.7 ms on one page (180 lines), in the event loop the requests are relayed on, every interval,
    per replica (this: ~0.05 ms). A sample line is `name[{labels}] value [timestamp]`; a label value may hold any
    character but a raw newline, so the value is what follows the line's last `}`."""
    for line in text.splitlines():
        if not line.startswith(names):
            continue
        cut = line.find("{")
        name = line[:cut] if cut >= 0 else line.split(None, 1)[0]
        if name not in names:  # a longer name that starts with one of them
            continue
        rest = line[line.rindex("}") + 1 :] if cut >= 0 else line[len(name) :]
        fields = rest.split()
        if not fields:
            raise ValueError(f"a sample of {name} without a value: {line!r}")
        yield name, float(fields[0])


def parse_load(text: str, at: float) -> RuntimeLoad:
    waiting, kv_total, kv_series = 0.0, 0.0, 0
    for name, value in samples(text, (contract.METRIC_WAITING, contract.METRIC_KV_USAGE)):
        if math.isnan(value):
            continue
        if name == contract.METRIC_WAITING:
            waiting += value
        else:
            kv_total += value
            kv_series += 1
    return RuntimeLoad(waiting=waiting, kv_usage=kv_total / max(kv_series, 1), at=at)


class LoadScraper:
    def __init__(self, endpoints: Callable[[], Iterable[Endpoint]], interval: float, timeout: float = 1.0) -> None:
        self._endpoints = endpoints
        self.interval = interval
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self.loads: dict[str, RuntimeLoad] = {}  # by endpoint url

    def get(self, url: str) -> RuntimeLoad | None:
        load = self.loads.get(url)
        if load is None or time.monotonic() - load.at > 3 * self.interval:
            return None
        return load

    async def run(self) -> None:
        async with aiohttp.ClientSession(timeout=self._timeout) as session:
            while True:
                started = time.monotonic()
                urls = sorted({ep.url for ep in self._endpoints()})
                await asyncio.gather(*(self._one(session, url) for url in urls))
                for url in set(self.loads) - set(urls):
                    del self.loads[url]
                await asyncio.sleep(max(0.05, self.interval - (time.monotonic() - started)))

    async def _one(self, session: aiohttp.ClientSession, url: str) -> None:
        try:
            async with session.get(url + contract.METRICS_PATH) as response:
                if response.status == 200:
                    self.loads[url] = parse_load(await response.text(), time.monotonic())
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            log.debug("scraping %s failed: %s", url, exc)

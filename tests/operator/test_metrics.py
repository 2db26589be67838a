"""Scraping /metrics: parsing (with prometheus_client's parser), and concurrent scrapes over real HTTP on loopback
with a timeout per pod and a cap on scrapes in flight."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from aiohttp import web

from kubellm.operator.metrics import MetricsError, Scraper, ScrapeTarget, metrics_url, parse_metrics

PAGE = """\
# HELP vllm:num_requests_waiting Requests waiting to be scheduled.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{model_name="a"} 3.0
vllm:num_requests_waiting{model_name="b"} 2.0
# HELP vllm:num_requests_running Requests in the running batch.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="a"} 7.0
# HELP vllm:kv_cache_usage_perc Fraction of KV-cache blocks held by requests.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{model_name="a"} 0.25
vllm:kv_cache_usage_perc{model_name="b"} 0.75
# HELP vllm:cache_config_info KV-cache configuration.
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{block_size="16",model_name="a",num_gpu_blocks="1024"} 1.0
"""


def test_parse_sums_waiting_and_running_and_averages_kv() -> None:
    m = parse_metrics("pod-a", PAGE)
    assert (m.pod, m.num_requests_waiting, m.num_requests_running) == ("pod-a", 5.0, 7.0)
    assert m.kv_cache_usage == pytest.approx(0.5)


def test_parse_refuses_pages_without_the_gauges() -> None:
    with pytest.raises(MetricsError, match="vllm:kv_cache_usage_perc"):
        parse_metrics(
            "p",
            "# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting 1\n"
            "# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running 1\n",
        )
    with pytest.raises(MetricsError):
        parse_metrics("p", "this is { not prometheus\n")


def test_parse_the_runtime_servers_own_exposition() -> None:
    """The contract with the runtime: what its /metrics renders is what the operator reads."""
    from kubellm.runtime.outputs import EngineStats
    from kubellm.runtime.server.metrics import ServerMetrics

    stats = EngineStats(
        num_requests_waiting=6, num_requests_running=3, kv_cache_usage=0.4, num_gpu_blocks=512, block_size=16
    )
    text = ServerMetrics("smollm2", lambda: stats).render().decode()
    m = parse_metrics("pod", text)
    assert (m.num_requests_waiting, m.num_requests_running, m.kv_cache_usage) == (6.0, 3.0, pytest.approx(0.4))


def test_metrics_url_brackets_ipv6() -> None:
    assert metrics_url("10.0.0.7") == "http://10.0.0.7:8000/metrics"
    assert metrics_url("fd00::7", 9000) == "http://[fd00::7]:9000/metrics"


class _Pods:
    """A real aiohttp server playing several pods: good ones, a slow one, a broken one, a garbage one."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.max_in_flight = 0
        self.release = asyncio.Event()

    async def good(self, request: web.Request) -> web.Response:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(0.05)  # hold the request so that concurrent scrapes overlap
            return web.Response(text=PAGE, content_type="text/plain")
        finally:
            self.in_flight -= 1

    async def slow(self, request: web.Request) -> web.Response:
        await self.release.wait()  # answers only after the test is done: longer than any timeout
        return web.Response(text=PAGE)

    async def broken(self, request: web.Request) -> web.Response:
        return web.Response(status=503, text="loading")

    async def garbage(self, request: web.Request) -> web.Response:
        return web.Response(text="<html>not metrics</html>")


@asynccontextmanager
async def _serve_pods() -> AsyncIterator[tuple[_Pods, str]]:
    state = _Pods()
    app = web.Application()
    app.router.add_get("/good/{i}", state.good)
    app.router.add_get("/slow", state.slow)
    app.router.add_get("/broken", state.broken)
    app.router.add_get("/garbage", state.garbage)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield state, f"http://127.0.0.1:{port}"
    finally:
        state.release.set()
        await runner.cleanup()


async def test_scrape_collects_good_pods_and_reports_each_failure() -> None:
    async with _serve_pods() as (state, base):
        await _scrape_and_check(state, base)


async def _scrape_and_check(state: _Pods, base: str) -> None:
    scraper = Scraper(timeout_seconds=0.5, concurrency=3)
    targets = [ScrapeTarget(f"good-{i}", f"{base}/good/{i}") for i in range(7)] + [
        ScrapeTarget("slow", f"{base}/slow"),
        ScrapeTarget("broken", f"{base}/broken"),
        ScrapeTarget("garbage", f"{base}/garbage"),
        ScrapeTarget("gone", "http://127.0.0.1:9/metrics"),  # nothing listens on the discard port
    ]
    try:
        result = await scraper.scrape(targets)
    finally:
        await scraper.close()
    assert sorted(s.pod for s in result.samples) == [f"good-{i}" for i in range(7)], result.failures
    failures = dict(result.failures)
    assert set(failures) == {"slow", "broken", "garbage", "gone"}
    assert failures["slow"] == "timed out"
    assert "503" in failures["broken"]
    assert "MetricsError" in failures["garbage"]
    # The cap held: never more than 3 scrapes in flight, and they did overlap.
    assert 2 <= state.max_in_flight <= 3

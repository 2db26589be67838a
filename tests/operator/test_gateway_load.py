"""The gateways' held requests as the operator reads them: each gateway's real exposition (GatewayMetrics), served
over loopback by two gateway "pods", summed per LLMDeployment; one that cannot be read counts as holding nothing."""

from __future__ import annotations

import asyncio
import socket

import pytest
from aiohttp import web
from prometheus_client import generate_latest

from kubellm.gateway.metrics import GatewayMetrics
from kubellm.operator.gateway_load import GatewayLoad, parse_held
from kubellm.operator.settings import Settings, SettingsError


def exposition(held: dict[tuple[str, str, str], int]) -> bytes:
    metrics = GatewayMetrics()
    for (namespace, name, served), count in held.items():
        metrics.held.labels(namespace, name, served).set(count)
    return generate_latest(metrics.registry)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_parse_held_sums_a_deployments_served_names() -> None:
    text = exposition({("ns", "chat", "chat"): 3, ("ns", "chat", "chat-alias"): 2, ("other", "code", "code"): 1})
    assert parse_held(text.decode()) == {("ns", "chat"): 5.0, ("other", "code"): 1.0}


def test_every_gateway_pod_is_read_and_a_dead_one_holds_nothing(caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()
    pages = {
        "127.0.0.1": exposition({("ns", "chat", "chat"): 7, ("ns", "code", "code"): 1}),
        "127.0.0.2": exposition({("ns", "chat", "chat"): 5}),
    }

    async def scenario() -> tuple[dict[tuple[str, str], float], dict[tuple[str, str], float]]:
        runners = []
        for host, page in pages.items():

            async def metrics(_: web.Request, page: bytes = page) -> web.Response:
                return web.Response(body=page, content_type="text/plain")

            app = web.Application()
            app.router.add_get("/metrics", metrics)
            runner = web.AppRunner(app)
            await runner.setup()
            await web.TCPSite(runner, host, port).start()
            runners.append(runner)
        urls = [f"http://127.0.0.1:{port}/metrics", f"http://127.0.0.2:{port}/metrics"]
        dead = f"http://127.0.0.3:{port}/metrics"  # nothing listens there
        try:
            both = await GatewayLoad(urls, timeout_seconds=2).held()
            with_dead = await GatewayLoad([*urls, dead], timeout_seconds=2).held()
        finally:
            for runner in runners:
                await runner.cleanup()
        return both, with_dead

    both, with_dead = asyncio.run(scenario())
    assert both == {("ns", "chat"): 12.0, ("ns", "code"): 1.0}
    assert with_dead == both
    assert "127.0.0.3" in caplog.text  # the failing gateway is named in the log


def test_the_setting_takes_urls_and_refuses_anything_else() -> None:
    env = {"KUBELLM_GATEWAY_METRICS_URLS": "http://gw-pods.kubellm:8080/metrics, http://10.0.0.7:8080/metrics"}
    assert Settings.from_env(env).gateway_metrics_urls == (
        "http://gw-pods.kubellm:8080/metrics",
        "http://10.0.0.7:8080/metrics",
    )
    with pytest.raises(SettingsError, match="KUBELLM_GATEWAY_METRICS_URLS: 'gw-pods:8080' is not an http"):
        Settings.from_env({"KUBELLM_GATEWAY_METRICS_URLS": "gw-pods:8080"})

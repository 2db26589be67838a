"""A request held while its model's one replica is Ready in the API but its runtime does not listen yet (kwok marks
pods Ready before their runtime is; a real cluster sees it when a runtime restarts): through the real gateway app
over loopback, without a cluster. Each refused connect ejects the replica, the request is held again, and once the
runtime listens it goes through. Its log line counts all of that waiting as held (not as latency the gateway added),
and a held stream gets its keepalives however often the hold was interrupted."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from kubellm.gateway.app import Gateway, build_app
from kubellm.gateway.settings import GatewaySettings

pytestmark = pytest.mark.asyncio(loop_scope="session")

EJECT, KEEPALIVE = 0.1, 0.3  # ejections shorter than the keepalive interval: each hold is cut before a keepalive


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _serve(port: int) -> web.AppRunner:
    async def chat(_: web.Request) -> web.StreamResponse:
        return web.Response(text='data: {"x": 1}\n\ndata: [DONE]\n\n', content_type="text/event-stream")

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


def _retries(gw: Gateway) -> float:
    value = gw.metrics.registry.get_sample_value(
        "kubellm_gateway_upstream_retries_total", {"model_name": "late-chat", "reason": "connect"}
    )
    return value or 0.0


async def test_a_request_held_across_refused_connects_counts_it_all_as_held(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "kubellm.gateway.access")
    runtime_port = _free_port()  # nothing listens there until the runtime "starts"
    settings = GatewaySettings(eject_seconds=EJECT, keepalive_seconds=KEEPALIVE, hold_timeout_seconds=60)
    gw = Gateway(settings, kube=None)
    model = {"source": "builtin:x", "servedModelName": "late-chat"}
    gw.registry.model_event("ADDED", {"metadata": {"name": "late", "namespace": "a"}, "spec": {"model": model}})
    pod: dict[str, Any] = {
        "metadata": {"name": "late-0", "namespace": "a", "labels": {"app.kubernetes.io/instance": "late"}},
        "spec": {"containers": [{"name": "runtime", "ports": [{"name": "http", "containerPort": runtime_port}]}]},
        "status": {"podIP": "127.0.0.1", "conditions": [{"type": "Ready", "status": "True"}]},
    }
    gw.registry.pod_event("ADDED", pod)
    runner = web.AppRunner(build_app(gw), handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
    runtime = None
    try:
        body = {"model": "late-chat", "messages": [{"role": "user", "content": "hi"}], "stream": True}
        async with aiohttp.ClientSession() as session, session.post(f"{url}/v1/chat/completions", json=body) as r:
            assert r.status == 200
            # held, tried, ejected, held again: wait for several rounds of that, then for a keepalive
            first = await asyncio.wait_for(r.content.readline(), 10)
            assert first == b": waiting for late-chat\n", first
            for _ in range(1000):  # a few more rounds of it (each ejection lasts EJECT)
                if _retries(gw) >= 3:
                    break
                await asyncio.sleep(0.01)
            assert _retries(gw) >= 3, "the request was not retried while held"
            runtime = await _serve(runtime_port)
            text = (await asyncio.wait_for(r.content.read(), 10)).decode()
        assert text.rstrip().endswith("data: [DONE]"), text
    finally:
        if runtime is not None:
            await runtime.cleanup()
        await runner.cleanup()
    (line,) = [json.loads(r.getMessage()) for r in caplog.records if r.name == "kubellm.gateway.access"]
    assert line["status"] == 200 and line["retries"] >= 3, line
    # held: all of the waiting, every stretch of it (each one shorter than EJECT); added: the parse, pick, connects
    assert line["held_s"] >= 2 * EJECT, line
    assert line["added_ms"] / 1000 < line["held_s"] / 2, line
    assert gw.metrics.registry.get_sample_value("kubellm_gateway_hold_seconds_count", {"model_name": "late-chat"}) == 1

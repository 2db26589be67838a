"""The runtime's WebSocket chat through the gateway (issue #16: "WebSocket proxied"), end to end with a real runtime:
a socket is routed by its first create message, generations stream back and can be cancelled, a create naming
another model is refused in-band, and a client that leaves ends the upstream socket (the runtime aborts)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from e2e.gateway_harness import create_llmd, harness, llmd_spec, served_models
from e2e.operator_process import OperatorProcess
from prometheus_client.parser import text_string_to_metric_families

pytestmark = [pytest.mark.k8s, pytest.mark.slow]

PATH = "/v1/chat/completions/ws"


def _request(model: str, max_tokens: int) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": "Tell me about rivers."}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
    }


async def _next(ws: aiohttp.ClientWebSocketResponse, gen_id: str) -> dict[str, Any]:
    while True:
        msg = await asyncio.wait_for(ws.receive(), timeout=60)
        assert msg.type == aiohttp.WSMsgType.TEXT, msg
        data = dict(json.loads(msg.data))
        if data.get("id") == gen_id:
            return data


async def _running(session: aiohttp.ClientSession, metrics_url: str) -> float:
    async with session.get(metrics_url) as r:
        text = await r.text()
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "vllm:num_requests_running"
    )


async def _drive(gateway_url: str, metrics_url: str) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(gateway_url + PATH) as ws:
            # an unknown model: refused in-band, and the socket stays open for a good one
            await ws.send_json({"type": "create", "id": "x", "request": _request("nope", 4)})
            refused = await _next(ws, "x")
            assert refused["type"] == "error" and refused["status"] == 404, refused
            await ws.send_json({"type": "create", "id": "a", "request": _request("sock-chat", 8)})
            chunks = []
            message = await _next(ws, "a")
            while message["type"] == "chunk":
                chunks.append(message["chunk"])
                message = await _next(ws, "a")
            assert message["type"] == "done" and message["finish_reasons"] == ["length"], message
            assert chunks and all(c["model"] == "sock-chat" for c in chunks)
            # the socket belongs to one model now
            await ws.send_json({"type": "create", "id": "b", "request": _request("beta-chat", 4)})
            other = await _next(ws, "b")
            assert other["type"] == "error" and other["status"] == 400 and other["error"]["param"] == "model"
            # a cancel goes through to the runtime
            await ws.send_json({"type": "create", "id": "c", "request": _request("sock-chat", 400)})
            assert (await _next(ws, "c"))["type"] == "chunk"
            await ws.send_json({"type": "cancel", "id": "c"})
            message = await _next(ws, "c")
            while message["type"] == "chunk":
                message = await _next(ws, "c")
            assert message["type"] == "cancelled" and message["usage"]["completion_tokens"] < 400, message
            # a generation in flight when the client leaves
            await ws.send_json({"type": "create", "id": "d", "request": _request("sock-chat", 400)})
            assert (await _next(ws, "d"))["type"] == "chunk"
        # the client left: the gateway closed the upstream socket, and the runtime aborted the generation
        deadline = asyncio.get_running_loop().time() + 30
        while await _running(session, metrics_url) > 0:
            assert asyncio.get_running_loop().time() < deadline, "the runtime still runs the abandoned generation"
            await asyncio.sleep(0.1)


def test_websocket_chat_through_the_gateway(
    k8s_cluster: Any, k8s_namespace: str, run_tag: str, e2e_operator: OperatorProcess, tmp_path: Path
) -> None:
    ns = k8s_namespace
    with harness(k8s_cluster, ns, run_tag, e2e_operator, tmp_path, ["sock"]) as (h, api):
        create_llmd(api, ns, "sock", llmd_spec("sock-chat"))
        h.wait(lambda: "sock-chat" in served_models(h.gateway), 60, "the model in /v1/models")
        (pod,) = h.wait(lambda: h.kubelets[0].serving(), 240, "the runtime to serve")
        asyncio.run(_drive(h.gateway.url, pod.url("/metrics")))
        # one access-log line per generation the gateway sent on (a, c, d; the refused x and b never went)
        lines = [json.loads(line) for line in h.gateway.log_tail(100_000).splitlines() if line.startswith("{")]
        sent = [line for line in lines if line.get("websocket")]
        assert [line["id"] for line in sent] == ["a", "c", "d"], sent
        assert {line["replica"] for line in sent} == {pod.name} and {line["model"] for line in sent} == {"sock-chat"}

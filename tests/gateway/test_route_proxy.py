"""An LLMRoute through the real gateway app over loopback HTTP, without a cluster: the registry is fed the objects
a watch would deliver, and two small HTTP servers stand in for the tiers' runtimes (one can be told to answer 429,
which a real runtime does only under overload; tests/gateway/test_route_k8s.py runs real runtimes)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from kubellm.gateway.app import Gateway, build_app
from kubellm.gateway.settings import GatewaySettings

# The fixtures run on the session loop (asyncio_default_fixture_loop_scope): the tests must too, or the servers
# they start would not run while a test waits on them.
pytestmark = pytest.mark.asyncio(loop_scope="session")


@dataclass
class StandIn:
    """A runtime stand-in: answers chat completions naming the model it was sent; 429 while `refuse` is set."""

    name: str
    refuse: bool = False
    seen: list[dict[str, Any]] = field(default_factory=list)
    port: int = 0
    answer: str | None = None  # as a classifier: the message content it answers
    delay: float = 0.0  # as a slow classifier: how long it takes to answer

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.seen.append(body)
        await asyncio.sleep(self.delay)
        if self.answer is not None:
            return web.json_response({"model": body["model"], "choices": [{"message": {"content": self.answer}}]})
        if self.refuse:
            error = {"message": "queue full", "type": "rate_limit_error", "param": None, "code": None}
            return web.json_response({"error": error}, status=429)
        if body.get("stream"):
            out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await out.prepare(request)
            await out.write(f"data: {json.dumps({'model': body['model']})}\n\ndata: [DONE]\n\n".encode())
            return out
        return web.json_response({"model": body["model"], "served_by": self.name})


@pytest.fixture
async def stand_ins() -> AsyncIterator[dict[str, StandIn]]:
    runners, out = [], {}
    for name in ("tiny", "big", "judge"):
        stand_in = StandIn(name, answer="large" if name == "judge" else None)
        app = web.Application()
        app.router.add_post("/v1/chat/completions", stand_in.chat)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        stand_in.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        runners.append(runner)
        out[name] = stand_in
    yield out
    for runner in runners:
        await runner.cleanup()


def _llmd(name: str, replicas: int = 1) -> dict[str, Any]:
    model = {"source": "builtin:x", "servedModelName": f"{name}-chat"}
    return {"metadata": {"name": name, "namespace": "a"}, "spec": {"model": model, "replicas": replicas}}


def _pod(owner: str, port: int) -> dict[str, Any]:
    return {
        "metadata": {"name": f"{owner}-0", "namespace": "a", "labels": {"app.kubernetes.io/instance": owner}},
        "spec": {"containers": [{"name": "runtime", "ports": [{"name": "http", "containerPort": port}]}]},
        "status": {"podIP": "127.0.0.1", "conditions": [{"type": "Ready", "status": "True"}]},
    }


ROUTE = {
    "metadata": {"name": "auto", "namespace": "a"},
    "spec": {
        "model": "auto",
        "tiers": [
            {"name": "small", "deployment": "tiny", "when": {"maxPromptTokens": 64, "tools": False}},
            {"name": "large", "deployment": "big"},
        ],
    },
}


@pytest.fixture
async def gateway(stand_ins: dict[str, StandIn]) -> AsyncIterator[tuple[Gateway, str]]:
    gw = Gateway(GatewaySettings(hold_timeout_seconds=0.5), kube=None)
    for name, stand_in in stand_ins.items():
        if name == "judge":
            continue  # the classifier's tests add it
        gw.registry.model_event("ADDED", _llmd(name))
        gw.registry.pod_event("ADDED", _pod(name, stand_in.port))
    gw.registry.route_event("ADDED", ROUTE)
    runner = web.AppRunner(build_app(gw), handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield gw, f"http://127.0.0.1:{port}"
    await runner.cleanup()


async def _chat(url: str, text: str, **extra: Any) -> tuple[int, dict[str, str], Any]:
    body = {"model": "auto", "messages": [{"role": "user", "content": text}], **extra}
    async with aiohttp.ClientSession() as session, session.post(f"{url}/v1/chat/completions", json=body) as r:
        data = await r.text()
        return r.status, dict(r.headers), json.loads(data) if not body.get("stream") else data


def _decisions(gw: Gateway, tier: str, reason: str) -> float:
    value = gw.metrics.registry.get_sample_value(
        "kubellm_gateway_route_decisions_total", {"route": "auto", "tier": tier, "reason": reason}
    )
    return value or 0.0


async def test_the_rules_pick_the_tier_and_the_request_names_its_served_model(
    gateway: tuple[Gateway, str], stand_ins: dict[str, StandIn], caplog: pytest.LogCaptureFixture
) -> None:
    gw, url = gateway
    caplog.set_level(logging.INFO, "kubellm.gateway.access")
    status, headers, body = await _chat(url, "Say hi.")
    assert status == 200 and body == {"model": "tiny-chat", "served_by": "tiny"}
    assert headers["x-kubellm-route-tier"] == "small" and headers["x-kubellm-route-deployment"] == "tiny"
    status, headers, body = await _chat(url, "word " * 100)
    assert status == 200 and body["served_by"] == "big" and headers["x-kubellm-route-tier"] == "large"
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    status, headers, _ = await _chat(url, "hi", tools=[tool])
    assert headers["x-kubellm-route-tier"] == "large"
    # Everything else in the body went upstream as the client sent it.
    assert stand_ins["big"].seen[-1]["tools"] == [tool]
    assert _decisions(gw, "small", "matched") == 1 and _decisions(gw, "large", "matched") == 2
    # A stream passes through, headers included.
    status, headers, text = await _chat(url, "hi", stream=True)
    assert status == 200 and headers["x-kubellm-route-tier"] == "small" and text.endswith("data: [DONE]\n\n")
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "kubellm.gateway.access"]
    assert [(line["llmroute"], line["tier"]) for line in lines] == [
        ("auto", t) for t in ("small", "large", "large", "small")
    ]
    # each line says when its request arrived and when it was sent on (a request held at zero: when it got through)
    for line in lines:
        arrived = datetime.fromisoformat(line["time"])
        assert arrived.tzinfo is not None and abs(time.time() - arrived.timestamp()) < 60, line
        assert 0 <= line["forwarded_s"] <= line["duration_s"], line


async def test_a_refusing_or_missing_tier_falls_over_to_the_next(
    gateway: tuple[Gateway, str], stand_ins: dict[str, StandIn]
) -> None:
    gw, url = gateway
    stand_ins["tiny"].refuse = True
    status, headers, body = await _chat(url, "Say hi.")
    assert status == 200 and body == {"model": "big-chat", "served_by": "big"}
    assert headers["x-kubellm-route-tier"] == "large"
    assert len(stand_ins["tiny"].seen) == 1  # tried once, refused before any byte: the next tier served
    assert _decisions(gw, "large", "fallback") == 1
    # The last tier has no next one: its 429 goes to the client as it came.
    stand_ins["big"].refuse = True
    status, headers, body = await _chat(url, "Say hi.")
    assert status == 429 and body["error"]["message"] == "queue full" and headers["x-kubellm-route-tier"] == "large"
    stand_ins["tiny"].refuse = stand_ins["big"].refuse = False
    # The small tier's pod goes: the large tier serves at once (no hold on a tier with a next one).
    gw.registry.pod_event("DELETED", _pod("tiny", stand_ins["tiny"].port))
    status, headers, _ = await _chat(url, "Say hi.")
    assert status == 200 and headers["x-kubellm-route-tier"] == "large"
    # Its LLMDeployment goes too: still the large tier.
    gw.registry.model_event("DELETED", _llmd("tiny"))
    status, headers, _ = await _chat(url, "Say hi.")
    assert status == 200 and headers["x-kubellm-route-tier"] == "large"
    assert _decisions(gw, "large", "fallback") == 4
    # The last tier without a replica: held like a direct request, then the 503 of a hold that timed out.
    gw.registry.pod_event("DELETED", _pod("big", stand_ins["big"].port))
    status, headers, body = await _chat(url, "word " * 100)
    assert status == 503 and body["error"]["code"] == "model_unavailable" and "big-chat" in body["error"]["message"]
    assert headers["x-kubellm-route-tier"] == "large"


async def test_models_list_the_route_and_bad_requests_name_the_field(gateway: tuple[Gateway, str]) -> None:
    gw, url = gateway
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{url}/v1/models") as r:
            cards = {m["id"]: m for m in (await r.json())["data"]}
        assert set(cards) == {"tiny-chat", "big-chat", "auto"}
        assert cards["auto"]["owned_by"] == "kubellm-route"
        assert [t["name"] for t in cards["auto"]["kubellm"]["tiers"]] == ["small", "large"]
        assert all(t["ready_replicas"] == 1 for t in cards["auto"]["kubellm"]["tiers"])
        async with session.get(f"{url}/v1/models/auto") as r:
            assert (await r.json())["kubellm"]["llmroute"] == "auto"
        async with session.post(f"{url}/v1/chat/completions", json={"model": "nope", "messages": []}) as r:
            assert r.status == 404 and "auto" in (await r.json())["error"]["message"]
    # A route without a default tier: a request no rule takes is a 400 naming the model.
    narrow = {**ROUTE, "spec": {"model": "auto", "tiers": ROUTE["spec"]["tiers"][:1]}}  # type: ignore[index]
    gw.registry.route_event("MODIFIED", narrow)
    status, _, body = await _chat(url, "word " * 100)
    assert status == 400 and body["error"]["param"] == "model" and body["error"]["code"] == "no_matching_tier"


async def test_a_classifier_chooses_among_the_tiers_whose_rules_hold(
    gateway: tuple[Gateway, str], stand_ins: dict[str, StandIn]
) -> None:
    gw, url = gateway
    judge = stand_ins["judge"]
    spec = json.loads(json.dumps(ROUTE["spec"]))
    spec["tiers"][0]["description"] = "greetings"
    spec["classifier"] = {"deployment": "judge", "timeoutSeconds": 0.3}
    gw.registry.route_event("MODIFIED", {**ROUTE, "spec": spec})

    def calls(outcome: str) -> float:
        labels = {"route": "auto", "outcome": outcome}
        return gw.metrics.registry.get_sample_value("kubellm_gateway_route_classifier_calls_total", labels) or 0.0

    # No classifier replica: the rules decide (the first tier whose rules hold).
    status, headers, _ = await _chat(url, "Say hi.")
    assert status == 200 and headers["x-kubellm-route-tier"] == "small" and calls("unavailable") == 1
    gw.registry.model_event("ADDED", _llmd("judge"))
    gw.registry.pod_event("ADDED", _pod("judge", judge.port))
    # Both tiers' rules hold for a short prompt: the classifier is asked, constrained to their names, and chooses.
    status, headers, body = await _chat(url, "Say hi.")
    assert status == 200 and headers["x-kubellm-route-tier"] == "large" and body["served_by"] == "big"
    (asked,) = judge.seen
    assert asked["model"] == "judge-chat" and asked["structured_outputs"] == {"choice": ["small", "large"]}
    assert "- small: greetings" in asked["messages"][0]["content"]
    assert asked["messages"][1] == {"role": "user", "content": "Say hi."}
    assert _decisions(gw, "large", "classified") == 1 and calls("chosen") == 1
    # Only one tier's rules hold (tools): nothing to ask.
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    status, headers, _ = await _chat(url, "hi", tools=[tool])
    assert headers["x-kubellm-route-tier"] == "large" and len(judge.seen) == 1
    # An answer that names no tier, a refusal, a classifier slower than its timeout: the rules decide.
    judge.answer = "medium"
    status, headers, _ = await _chat(url, "Say hi.")
    assert headers["x-kubellm-route-tier"] == "small"
    judge.answer, judge.refuse = None, True
    status, headers, _ = await _chat(url, "Say hi.")
    assert headers["x-kubellm-route-tier"] == "small"
    judge.answer, judge.refuse, judge.delay = "large", False, 2.0
    status, headers, _ = await _chat(url, "Say hi.")
    assert status == 200 and headers["x-kubellm-route-tier"] == "small"
    assert calls("failed") == 3 and _decisions(gw, "small", "matched") == 4
    # The classifier's choice falls over like the rules' one: its tier refusing, the next tier serves.
    judge.delay, judge.answer = 0.0, "small"
    stand_ins["tiny"].refuse = True
    status, headers, _ = await _chat(url, "Say hi.")
    assert headers["x-kubellm-route-tier"] == "large" and _decisions(gw, "large", "fallback") == 1

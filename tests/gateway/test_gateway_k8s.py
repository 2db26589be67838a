"""The gateway end to end: the real control plane, the operator, real `kubellm serve` processes on the pods' loopback
IPs (the e2e kubelet stand-in) and a real `kubellm gateway` process, driven with the official openai client.

    openai client ──▶ kubellm gateway ──watch──▶ kube-apiserver (LLMDeployments, EndpointSlices)
                           │ route by model / prefix, hold at zero, wake ──▶ operator scales 0 -> 1
                           ▼
                 runtimes on 127.x.y.z:8000 (RuntimeKubelet)
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any

import pytest
from e2e.gateway_harness import create_llmd, get_llmd, harness, llmd_spec, served_models
from e2e.operator_process import OperatorProcess

pytestmark = [pytest.mark.k8s, pytest.mark.slow]

HELD = "kubellm_gateway_held_requests"
WAKE = "kubellm.io/wake"


def test_routes_two_models_by_name_and_drops_a_replica_gone_not_ready(
    k8s_cluster: Any, k8s_namespace: str, run_tag: str, e2e_operator: OperatorProcess, tmp_path: Path
) -> None:
    import openai
    from kubernetes import client

    ns = k8s_namespace
    with harness(
        k8s_cluster, ns, run_tag, e2e_operator, tmp_path, ["alpha", "beta"], "--hold-timeout-seconds", "3"
    ) as (h, api):
        create_llmd(api, ns, "alpha", llmd_spec("alpha-chat"))
        create_llmd(api, ns, "beta", llmd_spec("beta-chat", routing={"strategy": "LeastLoad"}))
        h.wait(lambda: set(served_models(h.gateway)) == {"alpha-chat", "beta-chat"}, 60, "both models in /v1/models")
        h.wait(lambda: all(k.serving() for k in h.kubelets), 240, "both runtimes to serve")
        oai = openai.OpenAI(base_url=f"{h.gateway.url}/v1", api_key="unused", max_retries=0, timeout=120)
        assert {m.id for m in oai.models.list().data} == {"alpha-chat", "beta-chat"}

        # Routed by name: each answer comes from the named model's own pod.
        for kubelet, served in zip(h.kubelets, ["alpha-chat", "beta-chat"], strict=True):
            (pod,) = kubelet.serving()
            raw = oai.chat.completions.with_raw_response.create(
                model=served, messages=[{"role": "user", "content": "Say hi."}], max_tokens=8, temperature=0
            )
            reply = raw.parse()
            assert reply.model == served and reply.choices[0].message.content
            assert raw.headers["x-kubellm-replica"] == pod.name

        # Streaming passes through as SSE, ending with a finish reason.
        chunks = list(
            oai.chat.completions.create(
                model="alpha-chat", messages=[{"role": "user", "content": "Count to five."}], max_tokens=16, stream=True
            )
        )
        assert chunks and chunks[-1].choices[0].finish_reason in ("stop", "length")
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

        # An unknown model: OpenAI's 404, naming the ones there are.
        with pytest.raises(openai.NotFoundError) as missing:
            oai.chat.completions.create(model="gamma", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        error = missing.value.body
        assert isinstance(error, dict) and error["code"] == "model_not_found" and error["param"] == "model"
        assert "alpha-chat" in error["message"] and "beta-chat" in error["message"]

        # alpha's pod goes NotReady: its endpoint leaves the gateway within seconds; a request is held, then a 503
        # naming the model once the (3 s) hold timeout passes.
        (alpha_pod,) = h.kubelets[0].serving()
        core: Any = client.CoreV1Api(api)
        core.patch_namespaced_pod_status(
            alpha_pod.name, ns, {"status": {"conditions": [{"type": "Ready", "status": "False"}]}}
        )
        started = time.monotonic()
        h.wait(
            lambda: served_models(h.gateway)["alpha-chat"]["kubellm"]["ready_replicas"] == 0,
            10,
            "alpha's endpoint gone",
        )
        print(f"NotReady -> out of the gateway in {time.monotonic() - started:.2f} s")
        with pytest.raises(openai.APIStatusError) as unavailable:
            oai.completions.create(model="alpha-chat", prompt="Hello", max_tokens=4)
        assert unavailable.value.status_code == 503 and "alpha-chat" in unavailable.value.message
        assert "Retry-After" in unavailable.value.response.headers
        # beta still serves.
        assert oai.completions.create(model="beta-chat", prompt="Hello", max_tokens=4).choices[0].text is not None
        assert h.gateway.metric("kubellm_gateway_routing_decisions_total", model_name="beta-chat") >= 2


async def _held_then_gone(url: str, model: str) -> list[bytes]:
    """Open a streaming request, read until the gateway says it is waiting, then disconnect."""
    import aiohttp

    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True}
    lines: list[bytes] = []
    async with aiohttp.ClientSession() as session, session.post(f"{url}/v1/chat/completions", json=body) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
        while not lines or not lines[-1].startswith(b": waiting for"):
            lines.append((await asyncio.wait_for(r.content.readline(), 30)).strip())
    return lines


def test_scale_from_zero_holds_the_stream_until_the_operator_wakes_the_model(
    k8s_cluster: Any, k8s_namespace: str, run_tag: str, e2e_operator: OperatorProcess, tmp_path: Path
) -> None:
    import openai

    ns = k8s_namespace
    spec = llmd_spec(
        "sleepy-chat",
        replicas=0,
        autoscaling={"enabled": True, "minReplicas": 0, "maxReplicas": 1, "scaleToZeroAfterSeconds": 3600},
    )
    args = ("--keepalive-seconds", "0.5", "--max-held-per-model", "1", "--hold-timeout-seconds", "300")
    with harness(k8s_cluster, ns, run_tag, e2e_operator, tmp_path, ["sleepy"], *args) as (h, api):
        (kubelet,) = h.kubelets
        kubelet.hold()  # the woken pod's runtime waits (an image pull) until release()
        create_llmd(api, ns, "sleepy", spec)
        h.wait(lambda: "sleepy-chat" in served_models(h.gateway), 60, "the model at zero in /v1/models")
        gateway = h.gateway

        async def one_held_one_refused() -> tuple[list[bytes], int, str | None]:
            import aiohttp

            held = asyncio.create_task(_held_then_gone(gateway.url, "sleepy-chat"))
            await asyncio.to_thread(
                h.wait, lambda: gateway.metric(HELD, model_name="sleepy-chat") == 1, 30, "one request held"
            )
            body = {"model": "sleepy-chat", "prompt": "hi", "max_tokens": 4}
            async with (
                aiohttp.ClientSession() as session,
                session.post(f"{gateway.url}/v1/completions", json=body) as r,
            ):
                await r.read()
                refused = (r.status, r.headers.get("Retry-After"))
            return await held, *refused

        lines, status, retry_after = asyncio.run(one_held_one_refused())
        assert lines[-1] == b": waiting for sleepy-chat", lines
        assert status == 429 and retry_after is not None  # past the bound of 1 held request
        # The held client went away: nothing is left queued.
        h.wait(lambda: gateway.metric(HELD, model_name="sleepy-chat") == 0, 10, "the held count back to 0")
        # The held request woke the model: the operator scaled 0 -> 1 and removed the annotation.
        woken = h.wait(lambda: (o := get_llmd(api, ns, "sleepy"))["spec"]["replicas"] == 1 and o, 30, "a wake to 1")
        assert gateway.metric("kubellm_gateway_wakes_total", model_name="sleepy-chat") >= 1
        h.wait(
            lambda: WAKE not in (get_llmd(api, ns, "sleepy")["metadata"].get("annotations") or {}),
            30,
            "annotation gone",
        )
        assert woken["spec"]["replicas"] == 1

        # A stream waits (Ready pod, runtime not started: its connects fail), then the runtime starts and the
        # whole answer arrives through the gateway.
        kubelet.release()
        oai = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0, timeout=300)
        started = time.monotonic()
        stream = oai.chat.completions.create(
            model="sleepy-chat",
            messages=[{"role": "user", "content": "Name three colors."}],
            max_tokens=16,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        waited = time.monotonic() - started
        usage = chunks[-1].usage
        assert usage is not None and usage.completion_tokens >= 1, chunks[-1]
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert finish in (["stop"], ["length"]), finish
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text, chunks
        assert kubelet.serving(), "answered before a runtime served"
        assert gateway.metric(HELD, model_name="sleepy-chat") == 0
        assert gateway.metric("kubellm_gateway_hold_seconds_count", model_name="sleepy-chat") >= 1
        print(f"held stream answered after {waited:.1f} s: {text!r}")


def test_a_burst_at_zero_wakes_as_many_replicas_as_it_needs_and_every_request_completes(
    k8s_cluster: Any, k8s_namespace: str, run_tag: str, e2e_operator: OperatorProcess, tmp_path: Path
) -> None:
    """20 requests at once to a model at zero: the gateway holds them all and wakes the model with their count, the
    operator scales 0 -> 2 at once (ceil(20 / targetQueueDepth 4) = 5, capped by maxReplicas 2) instead of 0 -> 1,
    and every request gets its full answer."""
    from kubernetes import client

    ns = k8s_namespace
    spec = llmd_spec(
        "burst-chat",
        replicas=0,
        autoscaling={
            "enabled": True,
            "minReplicas": 0,
            "maxReplicas": 2,
            "targetQueueDepth": 4,
            "scaleToZeroAfterSeconds": 3600,
        },
    )
    with harness(k8s_cluster, ns, run_tag, e2e_operator, tmp_path, ["burst"], "--hold-timeout-seconds", "300") as (
        h,
        api,
    ):
        create_llmd(api, ns, "burst", spec)
        h.wait(lambda: "burst-chat" in served_models(h.gateway), 60, "the model at zero in /v1/models")

        async def burst() -> list[tuple[int, Any]]:
            import aiohttp

            body = {"model": "burst-chat", "prompt": "Count:", "max_tokens": 4, "ignore_eos": True}
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:

                async def one() -> tuple[int, Any]:
                    async with session.post(f"{h.gateway.url}/v1/completions", json=body) as r:
                        return r.status, await r.json()

                return await asyncio.gather(*(one() for _ in range(20)))

        answers = asyncio.run(burst())
        assert [status for status, _ in answers] == [200] * 20, answers
        assert all(a["usage"]["completion_tokens"] == 4 for _, a in answers)
        core: Any = client.CoreV1Api(api)
        events = core.list_namespaced_event(ns, field_selector="involvedObject.name=burst").items
        woken = [e.message for e in events if e.reason == "ScaledUp" and "woken" in (e.message or "")]
        assert woken and woken[0].endswith("20 requests held at the gateway: 0 -> 2"), woken
        assert h.gateway.metric("kubellm_gateway_wakes_total", model_name="burst-chat") == 1


async def _open_streams(url: str, bodies: list[dict[str, Any]]) -> list[str]:
    """Open the streams one after the other, each kept open while the next starts; the replica of each."""
    import aiohttp

    replicas: list[str] = []
    async with aiohttp.ClientSession() as session, contextlib.AsyncExitStack() as stack:
        for body in bodies:
            r = await stack.enter_async_context(session.post(f"{url}/v1/chat/completions", json=body))
            assert r.status == 200, await r.text()
            await asyncio.wait_for(r.content.readline(), 120)  # the first SSE line: the request runs upstream
            replicas.append(r.headers["x-kubellm-replica"])
    return replicas


def test_same_prefix_sticks_to_one_replica_until_the_load_bound_spills_it(
    k8s_cluster: Any, k8s_namespace: str, run_tag: str, e2e_operator: OperatorProcess, tmp_path: Path
) -> None:
    import openai

    ns = k8s_namespace
    with harness(k8s_cluster, ns, run_tag, e2e_operator, tmp_path, ["duo"]) as (h, api):
        (kubelet,) = h.kubelets
        create_llmd(api, ns, "duo", llmd_spec("duo-chat", replicas=2))
        h.wait(lambda: len(kubelet.serving()) == 2, 300, "both replicas to serve")
        h.wait(lambda: served_models(h.gateway)["duo-chat"]["kubellm"]["ready_replicas"] == 2, 30, "two endpoints")
        oai = openai.OpenAI(base_url=f"{h.gateway.url}/v1", api_key="unused", max_retries=0, timeout=120)
        system = {"role": "system", "content": "You answer in one word."}

        # One conversation, turn after turn: always the same replica (the one holding its prefix).
        history: list[Any] = [system, {"role": "user", "content": "Pick a color."}]
        seen = set()
        for turn in range(3):
            raw = oai.chat.completions.with_raw_response.create(
                model="duo-chat", messages=history, max_tokens=4, temperature=0
            )
            seen.add(raw.headers["x-kubellm-replica"])
            history += [{"role": "assistant", "content": raw.parse().choices[0].message.content or ""}]
            history += [{"role": "user", "content": f"Another one ({turn})."}]
        assert len(seen) == 1, seen
        (owner,) = seen

        # Three requests of that conversation in flight at once: with a load factor of 1.25 over 2 replicas the
        # bound is ceil(1.25 * (in flight + 1) / 2): the owner takes two, the third spills to the other replica.
        body = {"model": "duo-chat", "messages": history, "max_tokens": 200, "stream": True, "temperature": 0}
        replicas = asyncio.run(_open_streams(h.gateway.url, [body] * 3))
        assert replicas[:2] == [owner, owner] and replicas[2] != owner, (owner, replicas)
        assert h.gateway.metric("kubellm_gateway_routing_decisions_total", decision="spill") == 1

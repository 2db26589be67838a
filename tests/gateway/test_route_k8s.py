"""LLMRoutes against the real control plane: the API server's verdict on invalid routes (naming the field), the
gateway following routes by watch, and, end to end with the operator and two real `kubellm serve` runtimes, short
prompts to the small tier, long and tool-bearing ones to the large tier, and the fallover when the small tier is
gone (then its wake, and its return).

    openai client ──▶ kubellm gateway ──watch──▶ kube-apiserver (LLMRoutes, LLMDeployments, pods)
                           │ model "auto": rules ─▶ tier small (LLMDeployment tiny) | tier large (LLMDeployment big)
                           ▼
                 runtimes on 127.x.y.z:8000 (RuntimeKubelet)
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from e2e.gateway_harness import create_llmd, get_llmd, harness, llmd_spec, runtime_successes, served_models
from e2e.gateway_process import GatewayProcess
from e2e.observer import GROUP, VERSION
from e2e.operator_process import OperatorProcess
from e2e.procs import wait_for

pytestmark = pytest.mark.k8s

ROUTES = "llmroutes"
TIERS = [
    {"name": "small", "deployment": "tiny", "when": {"maxPromptTokens": 64, "tools": False}},
    {"name": "large", "deployment": "big"},
]


def _route(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "LLMRoute", "metadata": {"name": name}, "spec": spec}


def _create_route(api: Any, ns: str, name: str, spec: dict[str, Any]) -> None:
    from kubernetes import client

    custom: Any = client.CustomObjectsApi(api)
    custom.create_namespaced_custom_object(GROUP, VERSION, ns, ROUTES, _route(name, spec), field_validation="Strict")


INVALID = [
    ({"model": "auto", "tiers": []}, "spec.tiers"),
    ({"model": "auto", "tiers": [{"name": "a", "deployment": "x"}, {"name": "a", "deployment": "y"}]}, "unique"),
    (
        {"model": "auto", "tiers": [{"name": "a", "deployment": "x", "when": {"lastUserMessageRegex": "(open"}}]},
        "spec.tiers[0].when.lastUserMessageRegex",
    ),
    (
        {
            "model": "auto",
            "tiers": [{"name": "a", "deployment": "x", "when": {"minPromptTokens": 9, "maxPromptTokens": 3}}],
        },
        "spec.tiers[0].when.minPromptTokens",
    ),
    ({"model": "auto", "tiers": [{"name": "a", "deployment": "Not_A_Name"}]}, "spec.tiers[0].deployment"),
    ({"model": "auto", "tiers": [{"name": "a", "deployment": "x", "when": {"minTokens": 3}}]}, "minTokens"),
    (
        {"model": "auto", "tiers": [{"name": "a", "deployment": "x", "when": {"maxRequestedTokens": 0}}]},
        "spec.tiers[0].when.maxRequestedTokens",
    ),
    ({"tiers": [{"name": "a", "deployment": "x"}]}, "spec.model"),
    (
        {"model": "auto", "tiers": TIERS, "classifier": {"deployment": "tiny", "timeoutSeconds": 0}},
        "spec.classifier.timeoutSeconds",
    ),
]


def test_the_api_server_refuses_invalid_llmroutes_naming_the_field(k8s_cluster: Any, k8s_namespace: str) -> None:
    from kubernetes.client.exceptions import ApiException

    api = k8s_cluster.api_client()
    try:
        for i, (spec, field) in enumerate(INVALID):
            with pytest.raises(ApiException) as refused:
                _create_route(api, k8s_namespace, f"bad-{i}", spec)
            # 422 from the schema and CEL; 400 for an unknown field (strict field validation, as kubectl's default)
            assert refused.value.status in (400, 422), (spec, refused.value.body)
            message = json.loads(refused.value.body)["message"]
            assert field in message, (spec, message)
        _create_route(api, k8s_namespace, "good", {"model": "auto", "tiers": TIERS})
    finally:
        api.close()
    # The short name and the printer columns.
    listed = k8s_cluster.kubectl("get", "llmr", "-n", k8s_namespace).stdout
    assert "good" in listed and "auto" in listed and "small" in listed, listed


def _cards(gateway: GatewayProcess) -> dict[str, dict[str, Any]]:
    with urllib.request.urlopen(f"{gateway.url}/v1/models", timeout=5) as r:
        return {m["id"]: m for m in json.load(r)["data"]}


def test_the_gateway_follows_routes_by_watch_and_an_llmdeployment_keeps_its_name(
    k8s_cluster: Any, k8s_namespace: str, tmp_path: Path
) -> None:
    from kubernetes import client

    ns, api = k8s_namespace, k8s_cluster.api_client()
    custom: Any = client.CustomObjectsApi(api)
    gateway = GatewayProcess(ns, k8s_cluster.env(), tmp_path / "gateway.log")
    try:
        gateway.start()
        _create_route(api, ns, "auto", {"model": "auto", "tiers": TIERS})
        started = time.monotonic()
        wait_for(lambda: "auto" in _cards(gateway), timeout=10, what="the route in /v1/models")
        print(f"created -> served in {time.monotonic() - started:.2f} s")
        card = _cards(gateway)["auto"]
        assert card["owned_by"] == "kubellm-route" and card["kubellm"]["llmroute"] == "auto"
        assert [t["name"] for t in card["kubellm"]["tiers"]] == ["small", "large"]
        patch = {"spec": {"tiers": [{"name": "only", "deployment": "big"}]}}
        custom.patch_namespaced_custom_object(GROUP, VERSION, ns, ROUTES, "auto", patch)
        wait_for(
            lambda: [t["name"] for t in _cards(gateway)["auto"]["kubellm"]["tiers"]] == ["only"],
            timeout=10,
            what="the route's update in /v1/models",
        )
        # An LLMDeployment serving the route's name keeps it: the route is logged and not served.
        create_llmd(api, ns, "clash", llmd_spec("auto"))
        wait_for(lambda: _cards(gateway)["auto"]["owned_by"] == "kubellm", timeout=10, what="the LLMDeployment's name")
        assert "LLMRoute" in gateway.log_tail() and "is not served" in gateway.log_tail()
        custom.delete_namespaced_custom_object(GROUP, VERSION, ns, "llmdeployments", "clash")
        wait_for(lambda: _cards(gateway)["auto"]["owned_by"] == "kubellm-route", timeout=10, what="the route back")
        custom.delete_namespaced_custom_object(GROUP, VERSION, ns, ROUTES, "auto")
        wait_for(lambda: "auto" not in _cards(gateway), timeout=10, what="the route gone from /v1/models")
    finally:
        gateway.stop()
        api.close()


async def test_a_collection_the_api_server_does_not_serve_is_empty_and_synced(
    k8s_cluster: Any, k8s_namespace: str
) -> None:
    """A cluster without the LLMRoute CRD (installed without the chart's CRDs): the routes' informer takes the 404 as
    no routes, so the gateway still gets ready and serves its LLMDeployments."""
    from kubellm.gateway.kube import Informer, Kube, KubeConfig

    kube = Kube(KubeConfig.load(str(k8s_cluster.kubeconfig)))
    path = f"/apis/{GROUP}/{VERSION}/namespaces/{k8s_namespace}/nothings"
    replaced: list[list[Any]] = []
    informers = [
        Informer(kube, path, on_replace=replaced.append, on_event=lambda *_: None, missing_ok=missing_ok)
        for missing_ok in (True, False)
    ]
    tasks = [asyncio.create_task(i.run()) for i in informers]
    try:
        await asyncio.wait_for(informers[0].synced.wait(), 10)
        assert replaced == [[]]
        assert not informers[1].synced.is_set()  # without missing_ok a 404 is an error, retried with backoff
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await kube.close()


def _chat_tier(oai: Any) -> str:
    """One short chat through the route; the tier that answered."""
    raw = oai.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "Say hi."}], max_tokens=4, temperature=0
    )
    assert raw.parse().choices
    return str(raw.headers["x-kubellm-route-tier"])


@pytest.mark.slow
def test_short_prompts_go_small_long_and_tool_bearing_ones_large_and_a_gone_tier_falls_over(
    k8s_cluster: Any, k8s_namespace: str, run_tag: str, e2e_operator: OperatorProcess, tmp_path: Path
) -> None:
    import openai
    from kubernetes import client

    ns = k8s_namespace
    with harness(k8s_cluster, ns, run_tag, e2e_operator, tmp_path, ["tiny", "big"]) as (h, api):
        small_spec = llmd_spec(
            "tiny-chat",
            autoscaling={"enabled": True, "minReplicas": 0, "maxReplicas": 1, "scaleToZeroAfterSeconds": 3600},
        )
        create_llmd(api, ns, "tiny", small_spec)
        create_llmd(api, ns, "big", llmd_spec("big-chat"))
        _create_route(api, ns, "auto", {"model": "auto", "tiers": TIERS})
        h.wait(lambda: {"auto", "tiny-chat", "big-chat"} <= set(served_models(h.gateway)), 60, "all in /v1/models")
        h.wait(lambda: all(k.serving() for k in h.kubelets), 240, "both runtimes to serve")
        h.wait(
            lambda: all(t["ready_replicas"] == 1 for t in served_models(h.gateway)["auto"]["kubellm"]["tiers"]),
            30,
            "both tiers ready in the gateway",
        )
        (tiny_pod,), (big_pod,) = (k.serving() for k in h.kubelets)
        runtimes = {"tiny": tiny_pod.url("/metrics"), "big": big_pod.url("/metrics")}
        oai = openai.OpenAI(base_url=f"{h.gateway.url}/v1", api_key="unused", max_retries=0, timeout=120)

        def ask(expected: str, model: str, **request: Any) -> Any:
            before = {name: runtime_successes(url) for name, url in runtimes.items()}
            raw = oai.chat.completions.with_raw_response.create(model="auto", max_tokens=4, temperature=0, **request)
            reply = raw.parse()
            after = {name: runtime_successes(url) for name, url in runtimes.items()}
            moved = {name for name in runtimes if after[name] > before[name]}
            assert moved == {model}, (expected, before, after)  # the tier's runtime did the work, the other none
            assert raw.headers["x-kubellm-route-tier"] == expected, raw.headers
            assert raw.headers["x-kubellm-route-deployment"] == model
            assert reply.model == f"{model}-chat" and reply.choices, reply
            return reply

        ask("small", "tiny", messages=[{"role": "user", "content": "Say hi."}])
        long_prompt = "Summarize this: " + "the quick brown fox jumps over the lazy dog " * 8  # ~100 est. tokens
        ask("large", "big", messages=[{"role": "user", "content": long_prompt}])
        weather = {
            "type": "function",
            "function": {
                "name": "weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
        ask("large", "big", messages=[{"role": "user", "content": "Weather in Paris?"}], tools=[weather])
        # A stream through the route, the tier in its headers.
        with oai.chat.completions.with_streaming_response.create(
            model="auto", messages=[{"role": "user", "content": "Count."}], max_tokens=8, stream=True
        ) as streamed:
            assert streamed.headers["x-kubellm-route-tier"] == "small"
            assert any(line.startswith("data: [DONE]") for line in streamed.iter_lines())
        assert h.gateway.metric("kubellm_gateway_route_decisions_total", route="auto", reason="matched") == 4

        # The small tier goes to zero: its pod goes, and a short prompt falls over to the large tier at once.
        custom: Any = client.CustomObjectsApi(api)
        custom.patch_namespaced_custom_object(GROUP, VERSION, ns, "llmdeployments", "tiny", {"spec": {"replicas": 0}})
        h.wait(lambda: not h.kubelets[0].live(), 60, "the small tier's pod gone")
        # Its runtime exits (preStop, drain) before it is woken: kwok may give the next pod the same loopback IP, where
        # a runtime still draining would answer for it (in a cluster a new pod never shares a live pod's IP).
        h.wait(h.kubelets[0].all_exited, 60, "the small tier's runtime exited")
        h.wait(lambda: served_models(h.gateway)["tiny-chat"]["kubellm"]["ready_replicas"] == 0, 10, "no small replica")
        del runtimes["tiny"]  # no runtime there to count
        started = time.monotonic()
        ask("large", "big", messages=[{"role": "user", "content": "Say hi."}])
        print(f"fallover answered in {time.monotonic() - started:.2f} s")
        assert h.gateway.metric("kubellm_gateway_route_decisions_total", tier="large", reason="fallback") == 1
        # ...and woke the small tier, which the operator scales back to one replica; it serves short prompts again.
        # (the wake is written --wake-gather-seconds after the request, counting the requests held with it)
        h.wait(lambda: h.gateway.metric("kubellm_gateway_wakes_total", model_name="tiny-chat") >= 1, 10, "a wake")
        h.wait(lambda: get_llmd(api, ns, "tiny")["spec"]["replicas"] == 1, 30, "the small tier woken")
        h.wait(lambda: h.kubelets[0].serving(), 240, "the small tier's new runtime serving")
        h.wait(lambda: served_models(h.gateway)["tiny-chat"]["kubellm"]["ready_replicas"] == 1, 30, "small ready")
        (tiny_pod,) = h.kubelets[0].serving()
        runtimes["tiny"] = tiny_pod.url("/metrics")
        ask("small", "tiny", messages=[{"role": "user", "content": "Say hi."}])
        # The access log names the route and the tier of every request.
        lines = [json.loads(line) for line in h.gateway.log_tail(100_000).splitlines() if line.startswith("{")]
        tiers = [line["tier"] for line in lines if line.get("llmroute") == "auto"]
        assert tiers == ["small", "large", "large", "small", "large", "small"], tiers

        # A classifier (the small model itself) chooses among the tiers whose rules hold: for a short prompt both.
        spec = {"classifier": {"deployment": "tiny", "timeoutSeconds": 30}}
        custom.patch_namespaced_custom_object(GROUP, VERSION, ns, ROUTES, "auto", {"spec": spec})
        h.wait(lambda: served_models(h.gateway)["auto"]["kubellm"]["classifier"] == "tiny", 10, "the classifier")
        before = runtime_successes(runtimes["tiny"])
        assert _chat_tier(oai) in ("small", "large")
        assert runtime_successes(runtimes["tiny"]) > before  # it classified (and perhaps answered too)
        assert h.gateway.metric("kubellm_gateway_route_classifier_calls_total", outcome="chosen") == 1
        assert h.gateway.metric("kubellm_gateway_route_decisions_total", reason="classified") == 1
        assert h.gateway.metric("kubellm_gateway_route_classifier_calls_total", outcome="failed") == 0

"""Requests held at the gateway while a model's replicas exist but none is Ready feed the autoscaler (at zero the
wake annotation carries the count; this is the other case): the operator reads the gateway's
kubellm_gateway_held_requests (KUBELLM_GATEWAY_METRICS_URLS) and sizes a scale-up from that queue alone."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import pytest
from e2e.gateway_harness import create_llmd, get_llmd, harness, llmd_spec, served_models
from e2e.operator_process import OperatorProcess, _free_port
from e2e.procs import MARK_ENV

pytestmark = pytest.mark.k8s

HELD = "kubellm_gateway_held_requests"
HELD_REQUESTS = 6
TARGET_QUEUE_DEPTH = 2


async def _hold(url: str, model: str, count: int) -> None:
    """`count` streaming requests to the gateway, read until cancelled (then their connections close)."""
    import aiohttp

    body = {"model": model, "prompt": "Count:", "max_tokens": 2, "stream": True}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:

        async def one() -> None:
            with contextlib.suppress(aiohttp.ClientError):
                async with session.post(f"{url}/v1/completions", json=body) as r:
                    await r.read()

        await asyncio.gather(*(one() for _ in range(count)))


def test_requests_held_while_no_replica_is_ready_scale_the_model_up(
    k8s_cluster: Any, k8s_namespace: str, run_tag: str, tmp_path: Path
) -> None:
    from kubernetes import client

    ns, port = k8s_namespace, _free_port()
    env = {**k8s_cluster.env(), MARK_ENV: run_tag, "KUBELLM_GATEWAY_METRICS_URLS": f"http://127.0.0.1:{port}/metrics"}
    operator = OperatorProcess(ns, env, tmp_path / "operator.log").start()
    spec = llmd_spec(
        "starting-chat",
        replicas=1,
        autoscaling={
            "enabled": True,
            "minReplicas": 1,
            "maxReplicas": 4,
            "targetQueueDepth": TARGET_QUEUE_DEPTH,
            "evaluationPeriodSeconds": 1,
        },
    )
    try:
        with harness(
            k8s_cluster, ns, run_tag, operator, tmp_path, ["starting"], "--hold-timeout-seconds", "300",
            gateway_port=port,
        ) as (h, api):  # fmt: skip
            create_llmd(api, ns, "starting", spec)
            (pod,) = h.wait(lambda: h.kubelets[0].serving(), 180, "the replica's runtime to serve")
            h.wait(lambda: served_models(h.gateway)["starting-chat"]["kubellm"]["ready_replicas"] == 1, 30, "ready")
            h.kubelets[0].hold()  # the replicas it scales to stay without a runtime: only the decision is tested
            # the one replica is no longer Ready (a restart, a failing probe): it exists, and cannot take requests
            core: Any = client.CoreV1Api(api)
            not_ready = {"status": {"conditions": [{"type": "Ready", "status": "False"}]}}
            core.patch_namespaced_pod_status(pod.name, ns, not_ready)
            h.wait(
                lambda: served_models(h.gateway)["starting-chat"]["kubellm"]["ready_replicas"] == 0,
                10,
                "the replica out of the gateway",
            )

            async def scenario() -> dict[str, Any]:
                holding = asyncio.create_task(_hold(h.gateway.url, "starting-chat", HELD_REQUESTS))
                try:
                    await asyncio.to_thread(
                        h.wait,
                        lambda: h.gateway.metric(HELD, model_name="starting-chat") == HELD_REQUESTS,
                        30,
                        "the requests held",
                    )

                    def scaled() -> dict[str, Any] | None:
                        obj = get_llmd(api, ns, "starting")  # the decision is recorded just after the scale write
                        decided = obj["spec"]["replicas"] > 1 and (obj.get("status") or {}).get("scalingDecisions")
                        return obj if decided else None

                    return dict(await asyncio.to_thread(h.wait, scaled, 60, "a scale-up on the held requests"))
                finally:
                    holding.cancel()  # the clients leave: their held requests go with them
                    with contextlib.suppress(asyncio.CancelledError):
                        await holding

            obj = asyncio.run(scenario())
            expected = HELD_REQUESTS // TARGET_QUEUE_DEPTH  # 6 held / 2 per replica = 3 (no Ready replica counted)
            assert obj["spec"]["replicas"] == expected, obj["spec"]
            decision = obj["status"]["scalingDecisions"][-1]
            assert (decision["fromReplicas"], decision["toReplicas"]) == (1, expected), decision
            assert f"({HELD_REQUESTS:g} held at the gateway)" in decision["reason"], decision
    finally:
        operator.stop()

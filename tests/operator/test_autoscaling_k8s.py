"""Metric-driven autoscaling against the real control plane: every Ready pod's IP (kwok hands out loopback
addresses) gets a real HTTP server rendering the runtime's own /metrics (kubellm.runtime.server.metrics) from a
queue depth the test sets; the operator scrapes them, scales up under load, and back down after it."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest
from aiohttp import web
from cluster import wait_until
from kubernetes import client

from kubellm.operator import constants as c

pytestmark = [pytest.mark.k8s, pytest.mark.slow]


class MetricsFleet:
    """One aiohttp server per Ready pod IP, on the runtime's port, in a background event loop."""

    def __init__(self, api: Any, namespace: str, instance: str) -> None:
        self.core: Any = client.CoreV1Api(api)
        self.namespace, self.instance = namespace, instance
        self.waiting_per_pod = 0
        self.kv_cache_usage = 0.1
        self.served: dict[str, web.AppRunner] = {}
        self.scrapes = 0
        self.loop = asyncio.new_event_loop()
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> MetricsFleet:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_event.set()
        self.thread.join(timeout=10)

    def _page(self) -> bytes:
        from kubellm.runtime.outputs import EngineStats
        from kubellm.runtime.server.metrics import ServerMetrics

        stats = EngineStats(
            num_requests_waiting=self.waiting_per_pod,
            num_requests_running=min(self.waiting_per_pod, 4),
            kv_cache_usage=self.kv_cache_usage,
            num_gpu_blocks=1024,
            block_size=16,
        )
        return ServerMetrics(self.instance, lambda: stats).render()

    async def _metrics(self, request: web.Request) -> web.Response:
        self.scrapes += 1
        return web.Response(body=self._page(), content_type="text/plain")

    async def _serve(self, ip: str) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, ip, c.CONTAINER_PORT).start()
        self.served[ip] = runner

    async def _main(self) -> None:
        selector = f"{c.LABEL_INSTANCE}={self.instance}"
        while not self.stop_event.is_set():
            pods = await asyncio.to_thread(self.core.list_namespaced_pod, self.namespace, label_selector=selector)
            for pod in pods.items:
                ip = pod.status.pod_ip
                if ip and ip not in self.served:
                    await self._serve(ip)
            await asyncio.sleep(0.2)
        for runner in self.served.values():
            await runner.cleanup()

    def _run(self) -> None:
        self.loop.run_until_complete(self._main())
        self.loop.close()


def test_queue_depth_scales_up_then_down(kubellm_operator: Any, op_namespace: str, api: Any) -> None:
    custom: Any = client.CustomObjectsApi(api)
    spec = {
        "model": {"source": "builtin:smollm2-135m-instruct"},
        "replicas": 1,
        "autoscaling": {
            "enabled": True,
            "minReplicas": 1,
            "maxReplicas": 3,
            "targetQueueDepth": 2,
            "evaluationPeriodSeconds": 1,
            "scaleDownStabilizationSeconds": 3,
            "maxScaleUpStep": 1,
            "maxScaleDownStep": 1,
        },
    }
    body = {"apiVersion": c.API_VERSION, "kind": c.KIND, "metadata": {"name": "auto"}, "spec": spec}
    custom.create_namespaced_custom_object(c.GROUP, c.VERSION, op_namespace, c.PLURAL, body)

    def llmd() -> dict[str, Any]:
        return dict(custom.get_namespaced_custom_object(c.GROUP, c.VERSION, op_namespace, c.PLURAL, "auto"))

    def decisions(obj: dict[str, Any]) -> list[tuple[int, int]]:
        return [(d["fromReplicas"], d["toReplicas"]) for d in (obj.get("status") or {}).get("scalingDecisions", [])]

    def conditions(obj: dict[str, Any]) -> dict[str, dict[str, Any]]:
        return {x["type"]: x for x in (obj.get("status") or {}).get("conditions", [])}

    with MetricsFleet(api, op_namespace, "auto") as fleet:
        # Idle: metrics flow, nothing moves.
        wait_until(
            lambda: conditions(llmd()).get("ScalingActive", {}).get("reason") == "MetricsAvailable",
            timeout=60,
            what="metrics from the first pod",
        )
        assert llmd()["spec"]["replicas"] == 1

        # Load: 6 waiting per pod against a target of 2 -> 3 replicas, one step per evaluation, capped at max.
        fleet.waiting_per_pod = 6
        obj = wait_until(
            lambda: (
                (o := llmd())["spec"]["replicas"] == 3
                and (o.get("status") or {}).get("readyReplicas") == 3
                and conditions(o).get("ScalingLimited", {}).get("reason") == "MaxReplicas"
                and o
            ),
            timeout=60,
            what="a scale-up to 3 under load, limited by maxReplicas",
        )
        ups = decisions(obj)
        assert ups[-2:] == [(1, 2), (2, 3)], ups
        assert "queue 6.00/replica (target 2)" in obj["status"]["scalingDecisions"][0]["reason"]
        assert obj["status"]["metrics"]["queueDepth"] >= 6

        # Load gone: after the stabilization window, back to 1, one replica at a time.
        fleet.waiting_per_pod = 0
        # The operator scales through the scale subresource, then records the decision in status: wait for both.
        obj = wait_until(
            lambda: (o := llmd())["spec"]["replicas"] == 1 and decisions(o)[-1:] == [(2, 1)] and o,
            timeout=60,
            what="a scale-down to 1 after the load, recorded in status",
        )
        downs = decisions(obj)[-2:]
        assert downs == [(3, 2), (2, 1)], downs
        assert fleet.scrapes > 0

    events: Any = client.CoreV1Api(api).list_namespaced_event(op_namespace, field_selector="involvedObject.name=auto")
    reasons = [e.reason for e in events.items]
    assert reasons.count("ScaledUp") >= 2 and reasons.count("ScaledDown") >= 2, reasons


def _llmd(api: Any, namespace: str, name: str) -> dict[str, Any]:
    custom: Any = client.CustomObjectsApi(api)
    return dict(custom.get_namespaced_custom_object(c.GROUP, c.VERSION, namespace, c.PLURAL, name))


def test_scale_to_zero_after_idle_then_wake_on_the_annotation(
    kubellm_operator: Any, op_namespace: str, api: Any, k8s_cluster: Any
) -> None:
    custom: Any = client.CustomObjectsApi(api)
    auto = {
        "enabled": True,
        "minReplicas": 0,
        "maxReplicas": 2,
        "scaleToZeroAfterSeconds": 3,
        "evaluationPeriodSeconds": 1,
        "scaleDownStabilizationSeconds": 1,
    }
    spec = {"model": {"source": "builtin:smollm2-135m-instruct"}, "replicas": 1, "autoscaling": auto}
    body = {"apiVersion": c.API_VERSION, "kind": c.KIND, "metadata": {"name": "nap"}, "spec": spec}
    custom.create_namespaced_custom_object(c.GROUP, c.VERSION, op_namespace, c.PLURAL, body)
    with MetricsFleet(api, op_namespace, "nap") as fleet:
        fleet.kv_cache_usage = 0.0  # idle: nothing waiting, nothing running, no KV in use
        # The decision's status write and the status of the pods going are two writers: wait for both (a
        # reconcile can report the pod gone before the loop records the decision that removed it).
        obj = wait_until(
            lambda: (
                (o := _llmd(api, op_namespace, "nap"))["spec"]["replicas"] == 0
                and (o.get("status") or {}).get("replicas") == 0
                and (o.get("status") or {}).get("scalingDecisions")
                and o
            ),
            timeout=60,
            what="scaled to zero after 3 s idle, the decision recorded, and no pod left",
        )
        assert fleet.scrapes > 0
    status = obj["status"]
    assert (status["ready"], status["desiredReplicas"], status["readyReplicas"]) == ("0/0", 0, 0)
    ready = {x["type"]: x for x in status["conditions"]}["Ready"]
    assert (ready["status"], ready["reason"]) == ("False", "ScaledToZero")
    assert status["scalingDecisions"][-1]["toReplicas"] == 0
    apps: Any = client.AppsV1Api(api)
    assert apps.read_namespaced_deployment("nap", op_namespace).spec.replicas == 0
    printed = k8s_cluster.kubectl("get", "llmd", "nap", "-n", op_namespace).stdout
    assert "0/0" in printed, printed
    # At zero there are no pods and so no metrics: over several evaluations nothing scales it up.
    deadline = time.monotonic() + 4
    while time.monotonic() < deadline:
        assert _llmd(api, op_namespace, "nap")["spec"]["replicas"] == 0
        time.sleep(0.5)
    # The documented signal: the wake annotation -> 1 replica, and the annotation is taken off.
    k8s_cluster.kubectl("annotate", "llmd", "nap", "-n", op_namespace, f"{c.ANNOTATION_WAKE}=now")
    woken = wait_until(
        lambda: (
            (o := _llmd(api, op_namespace, "nap"))["spec"]["replicas"] == 1
            and c.ANNOTATION_WAKE not in (o["metadata"].get("annotations") or {})
            and o
        ),
        timeout=30,
        what="woken to 1 replica, annotation removed",
    )
    assert woken["spec"]["replicas"] == 1

"""Autoscaling on KV-cache utilization, end to end (issue #17; the closed-loop test covers queue depth): real runtime
metrics on the real control plane drive a scale-up because the running sequences fill the KV cache, not because of a
queue. Four long generations on one replica whose cache is small: `vllm:kv_cache_usage_perc` passes the target, the
operator scales 1 -> 2, and the decision, its metrics and the ScaledUp Event name the KV cache.
"""

from __future__ import annotations

import json
import re
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from e2e.kubelet import RuntimeKubelet
from e2e.load import StreamingLoad
from e2e.observer import GROUP, PLURAL, VERSION, Observer
from e2e.operator_process import OperatorProcess
from e2e.procs import marked_processes, wait_for
from e2e.workload import TARGET_KV_UTILIZATION, kv_loop_spec

pytestmark = [pytest.mark.k8s, pytest.mark.slow]

NAME = "kvloop"
SPEC = kv_loop_spec(evaluation_period_s=1)


def _kv_percent(reason: str) -> int:
    """The KV figure a decision's reason gives ("... KV 41%/replica (target 30%) ..."); -1 if it gives none."""
    match = re.search(r"KV (\d+)%/replica", reason)
    return int(match.group(1)) if match else -1


def test_kv_cache_utilization_drives_a_scale_up(
    k8s_cluster: Any, k8s_namespace: str, run_tag: str, e2e_operator: OperatorProcess, tmp_path: Path
) -> None:
    from kubernetes import client

    api = k8s_cluster.api_client()
    custom: Any = client.CustomObjectsApi(api)
    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "LLMDeployment", "metadata": {"name": NAME}, "spec": SPEC}
    custom.create_namespaced_custom_object(GROUP, VERSION, k8s_namespace, PLURAL, body)
    tag = f"{run_tag}-runtime"
    kubelet = RuntimeKubelet(api, k8s_namespace, NAME, tmp_path, k8s_cluster.env(), tag=tag, max_pods=2)
    observer = Observer(api, k8s_namespace, NAME)

    def wait(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
        def checked() -> Any:
            kubelet.check()
            return predicate()

        try:
            return wait_for(checked, timeout=timeout, what=what, interval=0.25)
        except AssertionError as exc:
            raise AssertionError(
                f"{exc}\nlast snapshot: {observer.latest()}\n--- kubelet\n{kubelet.report()}\n"
                f"--- operator\n{e2e_operator.log_tail()}"
            ) from None

    with kubelet, observer:
        (pod,) = wait(lambda: kubelet.serving(), 180, "the first replica's runtime to serve /metrics")
        with urllib.request.urlopen(pod.url("/v1/models"), timeout=10) as response:
            served_name = json.load(response)["data"][0]["id"]
        kubelet.hold()  # the second replica never needs to run
        load = StreamingLoad(pod.url("/v1"), served_name, concurrency=4, max_tokens=400).start()
        try:
            up = wait(
                lambda: (s := observer.latest()) is not None and s.spec_replicas == 2 and s.decisions and s,
                180,
                "a scale-up to 2 replicas on KV-cache utilization",
            )
        finally:
            load.stop()
        assert not load.stats.errors, load.stats
        decision = up.decisions[-1]
        assert (decision["fromReplicas"], decision["toReplicas"]) == (1, 2), up.decisions
        assert _kv_percent(decision["reason"]) > TARGET_KV_UTILIZATION * 100, decision
        # what the operator saw when it decided: the cache past its target, and no queue to speak of
        scraped = [s.metrics for s in observer.timeline if s.metrics]
        assert max(m["kvCacheUtilization"] for m in scraped) > TARGET_KV_UTILIZATION, scraped
        assert max(m.get("queueDepth", 0) for m in scraped) < SPEC["autoscaling"]["targetQueueDepth"], scraped
        core: Any = client.CoreV1Api(api)

        def scaled_up_events() -> list[Any]:
            items = core.list_namespaced_event(k8s_namespace, field_selector=f"involvedObject.name={NAME}").items
            return [e for e in items if e.reason == "ScaledUp"]

        events = wait(scaled_up_events, 30, "a ScaledUp Event")
        assert any(_kv_percent(e.message or "") > TARGET_KV_UTILIZATION * 100 for e in events), [
            e.message for e in events
        ]
    assert kubelet.all_exited(), kubelet.report()
    assert marked_processes(tag) == [], "runtime processes outlived the test"
    api.close()

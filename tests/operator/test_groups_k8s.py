"""Replicas spanning several nodes against the real control plane (StatefulSet controller, endpointslice
controller, scheduler, kwok GPU nodes): a 2-node x 2-GPU LLMDeployment renders its group, scaling makes groups,
losing a pod restarts its group whole, only rank 0 is a Service endpoint, and switching back to one node
prunes the groups."""

from __future__ import annotations

from typing import Any

import pytest
from cluster import wait_until
from kubernetes import client

from kubellm.operator import constants as c

pytestmark = pytest.mark.k8s

SPEC = {
    "model": {"source": "builtin:smollm2-135m-instruct"},
    "replicas": 1,
    "resources": {"gpus": 2},
    "parallelism": {"tensor": 2, "pipeline": 2, "nodes": 2},
}


def _custom(api: client.ApiClient) -> Any:
    return client.CustomObjectsApi(api)


def _llmd(api: client.ApiClient, ns: str, name: str) -> dict[str, Any]:
    return dict(_custom(api).get_namespaced_custom_object(c.GROUP, c.VERSION, ns, c.PLURAL, name))


def _pods(api: client.ApiClient, ns: str, name: str) -> dict[str, Any]:
    """Live pods by name."""
    core: Any = client.CoreV1Api(api)
    items = core.list_namespaced_pod(ns, label_selector=f"{c.LABEL_INSTANCE}={name}").items
    return {p.metadata.name: p for p in items if p.metadata.deletion_timestamp is None}


def _whole(api: client.ApiClient, ns: str, name: str, groups: int) -> dict[str, Any] | None:
    """Every group's pods Ready, the workers stamped with their rank 0, rank 0 marked complete."""
    pods = _pods(api, ns, name)
    expected = {f"{name}-g{g}-{r}" for g in range(groups) for r in range(2)}
    if set(pods) != expected:
        return None
    for pod in pods.values():
        ready = any(cond.type == "Ready" and cond.status == "True" for cond in pod.status.conditions or [])
        notes = pod.metadata.annotations or {}
        rank = pod.metadata.labels.get(c.LABEL_POD_INDEX)
        leader = pods[pod.metadata.name[:-1] + "0"]
        if not ready or (rank == "0" and c.ANNOTATION_GROUP_COMPLETE not in notes):
            return None
        if rank != "0" and notes.get(c.ANNOTATION_GROUP_LEADER) != leader.metadata.uid:
            return None
    return pods


def _status(api: client.ApiClient, ns: str, name: str) -> dict[str, Any]:
    return dict(_llmd(api, ns, name).get("status") or {})


def _endpoint_pods(api: client.ApiClient, ns: str, service: str) -> set[str]:
    """The Ready pods the Service's selector picks, as the API server selects them: the endpointslice controller's
    input. (Its output cannot be read here: EndpointSlices refuse the loopback IPs the test's kwok pods have.)"""
    core: Any = client.CoreV1Api(api)
    selector = core.read_namespaced_service(service, ns).spec.selector
    listed = core.list_namespaced_pod(ns, label_selector=",".join(f"{k}={v}" for k, v in selector.items())).items
    return {
        p.metadata.name
        for p in listed
        if p.metadata.deletion_timestamp is None
        and any(cond.type == "Ready" and cond.status == "True" for cond in p.status.conditions or [])
    }


def test_groups_scale_restart_whole_and_serve_from_rank_0(
    kubellm_operator: Any, op_namespace: str, api: Any, k8s_cluster: Any
) -> None:
    ns, name = op_namespace, "grp"
    body = {"apiVersion": c.API_VERSION, "kind": c.KIND, "metadata": {"name": name}, "spec": SPEC}
    _custom(api).create_namespaced_custom_object(c.GROUP, c.VERSION, ns, c.PLURAL, body)
    apps: Any = client.AppsV1Api(api)
    core: Any = client.CoreV1Api(api)

    first = wait_until(lambda: _whole(api, ns, name, 1), timeout=90, what="group 0's two pods Ready and joined")
    sts = apps.read_namespaced_stateful_set(f"{name}-g0", ns)
    assert (sts.spec.replicas, sts.spec.service_name) == (2, f"{name}-g0")
    assert core.read_namespaced_service(f"{name}-g0", ns).spec.cluster_ip == "None"
    assert apps.list_namespaced_deployment(ns).items == [], "groups replace the Deployment"
    wait_until(
        lambda: (s := _status(api, ns, name)).get("readyReplicas") == 1 and s.get("replicas") == 1,
        timeout=60,
        what="status counting one ready group",
    )
    assert _endpoint_pods(api, ns, name) == {f"{name}-g0-0"}, "rank 0 alone behind the LLMDeployment's Service"
    assert _endpoint_pods(api, ns, f"{name}-g0") == {f"{name}-g0-0", f"{name}-g0-1"}

    k8s_cluster.kubectl("scale", "-n", ns, f"llmd/{name}", "--replicas=2")
    two = wait_until(lambda: _whole(api, ns, name, 2), timeout=90, what="two whole groups")
    wait_until(
        lambda: (s := _status(api, ns, name)).get("readyReplicas") == 2 and s.get("replicas") == 2,
        timeout=60,
        what="status counting two ready groups",
    )
    assert _endpoint_pods(api, ns, name) == {f"{name}-g0-0", f"{name}-g1-0"}, "each group's rank 0, no other pod"

    # A lost worker: its whole group restarts (rank 0 too), the other group is left alone.
    uids = {pod: p.metadata.uid for pod, p in two.items()}
    assert uids[f"{name}-g0-0"] == first[f"{name}-g0-0"].metadata.uid
    core.delete_namespaced_pod(f"{name}-g0-1", ns)

    def restarted() -> dict[str, Any] | None:
        pods = _whole(api, ns, name, 2)
        if pods is None:
            return None
        fresh = {pod for pod, p in pods.items() if p.metadata.uid != uids[pod]}
        return pods if fresh == {f"{name}-g0-0", f"{name}-g0-1"} else None

    wait_until(restarted, timeout=120, what="group 0 recreated whole, group 1 untouched")
    events = core.list_namespaced_event(ns, field_selector=f"involvedObject.name={name}").items
    assert any(e.reason == "GroupRestarted" for e in events), [e.reason for e in events]

    # Scaling down prunes the group above the replicas; back to one node, the groups give way to a Deployment.
    k8s_cluster.kubectl("scale", "-n", ns, f"llmd/{name}", "--replicas=1")
    wait_until(
        lambda: [s.metadata.name for s in apps.list_namespaced_stateful_set(ns).items] == [f"{name}-g0"],
        timeout=60,
        what="group 1's StatefulSet pruned",
    )
    wait_until(
        lambda: f"{name}-g1" not in {s.metadata.name for s in core.list_namespaced_service(ns).items},
        timeout=60,
        what="group 1's headless Service pruned",
    )
    patch = {"spec": {"resources": {"gpus": 4}, "parallelism": {"tensor": 2, "pipeline": 2, "nodes": 1}}}
    _custom(api).patch_namespaced_custom_object(c.GROUP, c.VERSION, ns, c.PLURAL, name, patch)
    wait_until(
        lambda: not apps.list_namespaced_stateful_set(ns).items and apps.list_namespaced_deployment(ns).items,
        timeout=60,
        what="the Deployment back and the groups pruned",
    )
    assert c.LABEL_POD_INDEX not in core.read_namespaced_service(name, ns).spec.selector

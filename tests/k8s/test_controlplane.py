"""The test control plane itself: API ready, kwok nodes with GPUs, scheduling, garbage collection, our CRD."""

from __future__ import annotations

import ipaddress
import json
import ssl
import subprocess
import urllib.request
from typing import Any

import pytest
from cluster import GPU_RESOURCE, ControlPlane, wait_until

# The test namespaces enforce Pod Security `restricted`, as platform teams set them.
RESTRICTED_POD = {"runAsNonRoot": True, "runAsUser": 65532, "seccompProfile": {"type": "RuntimeDefault"}}
RESTRICTED_CONTAINER = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}

pytestmark = pytest.mark.k8s


def _get_json(cluster: ControlPlane, *args: str) -> Any:
    return json.loads(cluster.kubectl("get", *args, "-o", "json").stdout)


def _apply(cluster: ControlPlane, namespace: str, manifest: dict[str, Any]) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(manifest))


def _deployment(name: str, replicas: int, resources: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {
                    "securityContext": RESTRICTED_POD,
                    "containers": [
                        {
                            "name": "main",
                            "image": "kubellm:test",
                            "resources": {"limits": resources},
                            "securityContext": RESTRICTED_CONTAINER,
                        }
                    ],
                },
            },
        },
    }


def _is_ready(pod: dict[str, Any]) -> bool:
    conditions = pod.get("status", {}).get("conditions", [])
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def test_apiserver_and_components_are_healthy(k8s_cluster: ControlPlane) -> None:
    assert k8s_cluster.kubectl("get", "--raw", "/readyz").stdout.strip() == "ok"
    version = json.loads(k8s_cluster.kubectl("version", "-o", "json").stdout)
    assert version["serverVersion"]["gitVersion"] == "v1.37.2"
    # The controller manager and the scheduler serve /healthz on their own (self-signed) loopback ports.
    insecure = ssl.create_default_context()
    insecure.check_hostname = False
    insecure.verify_mode = ssl.CERT_NONE
    for port in (k8s_cluster.ports.controller_manager, k8s_cluster.ports.scheduler):
        with urllib.request.urlopen(f"https://127.0.0.1:{port}/healthz", context=insecure, timeout=5) as response:
            assert response.read() == b"ok"


def test_python_client_and_helm_reach_the_cluster(k8s_cluster: ControlPlane) -> None:
    from kubernetes import client

    with k8s_cluster.api_client() as api:
        names = {node.metadata.name for node in client.CoreV1Api(api).list_node().items if node.metadata}
    assert names == {n.name for n in k8s_cluster.node_layout}
    assert k8s_cluster.helm is not None
    result = subprocess.run(
        [str(k8s_cluster.helm), "list", "--all-namespaces", "-o", "json"],
        env=k8s_cluster.env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []


def test_kwok_nodes_advertise_gpus_on_loopback(k8s_cluster: ControlPlane) -> None:
    items = _get_json(k8s_cluster, "nodes")["items"]
    by_name = {node["metadata"]["name"]: node for node in items}
    pod_cidr = ipaddress.ip_network(k8s_cluster.pod_cidr)
    for layout in k8s_cluster.node_layout:
        node = by_name[layout.name]
        assert _is_ready(node), node["status"]
        assert node["status"]["allocatable"].get(GPU_RESOURCE, "0") == str(layout.pool.gpus)
        internal_ip = next(a["address"] for a in node["status"]["addresses"] if a["type"] == "InternalIP")
        assert ipaddress.ip_address(internal_ip) in pod_cidr
        assert ipaddress.ip_network(node["spec"]["podCIDR"]).subnet_of(pod_cidr)  # type: ignore[arg-type]
    assert sum(1 for layout in k8s_cluster.node_layout if layout.pool.gpus) >= 2


def test_gpu_deployment_runs_on_gpu_nodes(k8s_cluster: ControlPlane, k8s_namespace: str) -> None:
    _apply(k8s_cluster, k8s_namespace, _deployment("gpu-app", 2, {GPU_RESOURCE: "1"}))

    def ready_pods() -> list[dict[str, Any]]:
        pods = _get_json(k8s_cluster, "pods", "-n", k8s_namespace, "-l", "app=gpu-app")["items"]
        return pods if len(pods) == 2 and all(_is_ready(p) for p in pods) else []

    pods = wait_until(ready_pods, timeout=60, what="2 Ready gpu-app pods")
    nodes = {n.name: n for n in k8s_cluster.node_layout}
    for pod in pods:
        node = nodes[pod["spec"]["nodeName"]]
        assert node.pool.gpus >= 1, f"{pod['metadata']['name']} landed on {node.name}, which has no GPU"
        assert pod["status"]["phase"] == "Running"
        # kwok hands out pod IPs from the node's own loopback subnet: real processes can listen there.
        assert ipaddress.ip_address(pod["status"]["podIP"]) in ipaddress.ip_network(node.pod_cidr)
    # The Deployment controller sees them too.
    wait_until(
        lambda: (
            _get_json(k8s_cluster, "deployment", "gpu-app", "-n", k8s_namespace)["status"].get("readyReplicas") == 2
        ),
        timeout=30,
        what="deployment readyReplicas == 2",
    )


def test_pod_asking_for_more_gpus_than_any_node_stays_pending(k8s_cluster: ControlPlane, k8s_namespace: str) -> None:
    most = max(n.pool.gpus for n in k8s_cluster.node_layout)
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "too-big"},
        "spec": {
            "securityContext": RESTRICTED_POD,
            "containers": [
                {
                    "name": "main",
                    "image": "x",
                    "resources": {"limits": {GPU_RESOURCE: str(most + 1)}},
                    "securityContext": RESTRICTED_CONTAINER,
                }
            ],
        },
    }
    _apply(k8s_cluster, k8s_namespace, pod)

    def unschedulable() -> dict[str, Any] | None:
        got = _get_json(k8s_cluster, "pod", "too-big", "-n", k8s_namespace)
        for condition in got["status"].get("conditions", []):
            if condition["type"] == "PodScheduled" and condition["status"] == "False":
                return dict(condition)
        return None

    condition = wait_until(unschedulable, timeout=60, what="PodScheduled=False on too-big")
    assert condition["reason"] == "Unschedulable"
    assert f"Insufficient {GPU_RESOURCE}" in condition["message"]
    got = _get_json(k8s_cluster, "pod", "too-big", "-n", k8s_namespace)
    assert got["status"]["phase"] == "Pending"
    assert not got["spec"].get("nodeName")
    events = wait_until(
        lambda: _get_json(
            k8s_cluster, "events", "-n", k8s_namespace, "--field-selector", "involvedObject.name=too-big"
        )["items"],
        timeout=30,
        what="an event for too-big",
    )
    assert any(e["reason"] == "FailedScheduling" for e in events), [e["reason"] for e in events]


def test_deleting_a_deployment_removes_its_replicaset_and_pods(k8s_cluster: ControlPlane, k8s_namespace: str) -> None:
    _apply(k8s_cluster, k8s_namespace, _deployment("owned", 1, {"cpu": "100m"}))
    wait_until(
        lambda: _get_json(k8s_cluster, "pods", "-n", k8s_namespace, "-l", "app=owned")["items"],
        timeout=60,
        what="the owned pod",
    )
    assert _get_json(k8s_cluster, "replicasets", "-n", k8s_namespace, "-l", "app=owned")["items"]

    k8s_cluster.kubectl("delete", "deployment", "owned", "-n", k8s_namespace, "--wait=false")

    def gone() -> bool:
        leftovers = [
            *_get_json(k8s_cluster, "replicasets", "-n", k8s_namespace, "-l", "app=owned")["items"],
            *_get_json(k8s_cluster, "pods", "-n", k8s_namespace, "-l", "app=owned")["items"],
        ]
        return not leftovers

    wait_until(gone, timeout=60, what="the ReplicaSet and Pod of the deleted Deployment to go")


def test_garbage_collector_deletes_dependents_of_a_deleted_owner(k8s_cluster: ControlPlane, k8s_namespace: str) -> None:
    _apply(k8s_cluster, k8s_namespace, {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "owner"}})
    owner_uid = _get_json(k8s_cluster, "configmap", "owner", "-n", k8s_namespace)["metadata"]["uid"]
    owner_ref = {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner_uid}
    for name, refs in (("dependent", [owner_ref]), ("bystander", [])):
        _apply(
            k8s_cluster,
            k8s_namespace,
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "ownerReferences": refs}},
        )

    k8s_cluster.kubectl("delete", "configmap", "owner", "-n", k8s_namespace, "--wait=false")

    def dependent_gone() -> bool:
        result = k8s_cluster.kubectl("get", "configmap", "dependent", "-n", k8s_namespace, check=False)
        return result.returncode != 0 and "NotFound" in result.stderr

    wait_until(dependent_gone, timeout=60, what="the garbage collector to delete the dependent ConfigMap")
    # An object without the owner reference is left alone.
    assert _get_json(k8s_cluster, "configmap", "bystander", "-n", k8s_namespace)["metadata"]["name"] == "bystander"


def test_llmdeployment_applies(k8s_cluster: ControlPlane, k8s_namespace: str) -> None:
    crds = k8s_cluster.kubectl("get", "crd", "-o", "name").stdout.split()
    if "customresourcedefinition.apiextensions.k8s.io/llmdeployments.kubellm.io" not in crds:
        pytest.skip(f"no LLMDeployment CRD in {k8s_cluster.config.crds_dir} yet")
    manifest = {
        "apiVersion": "kubellm.io/v1alpha1",
        "kind": "LLMDeployment",
        "metadata": {"name": "smol"},
        "spec": {"model": {"source": "builtin:smollm2-135m-instruct"}},
    }
    _apply(k8s_cluster, k8s_namespace, manifest)
    got = _get_json(k8s_cluster, "llmdeployment", "smol", "-n", k8s_namespace)
    assert got["spec"]["model"]["source"] == "builtin:smollm2-135m-instruct"
    # The short name from the CRD works too.
    assert k8s_cluster.kubectl("get", "llmd", "-n", k8s_namespace, "-o", "name").stdout.strip() == (
        "llmdeployment.kubellm.io/smol"
    )

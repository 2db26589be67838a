"""Drift correction against the real control plane: owned objects deleted or edited by hand (another field manager)
are put back within seconds; edits made while the operator is down are put back when it starts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from cluster import wait_until
from kubernetes import client

from kubellm.operator import constants as c

pytestmark = pytest.mark.k8s

SOURCE = "builtin:smollm2-135m-instruct"
IMAGE = "ghcr.io/kubellm/runtime:test"


def _create(api: Any, namespace: str, name: str, spec: dict[str, Any]) -> None:
    body = {"apiVersion": c.API_VERSION, "kind": c.KIND, "metadata": {"name": name}, "spec": spec}
    client.CustomObjectsApi(api).create_namespaced_custom_object(c.GROUP, c.VERSION, namespace, c.PLURAL, body)


def _deployment(api: Any, namespace: str, name: str) -> Any:
    try:
        return client.AppsV1Api(api).read_namespaced_deployment(name, namespace)
    except client.ApiException as exc:
        if exc.status == 404:
            return None
        raise


def _engine_json(api: Any, namespace: str, name: str) -> dict[str, Any] | None:
    try:
        cm = client.CoreV1Api(api).read_namespaced_config_map(f"{name}-engine", namespace)
    except client.ApiException as exc:
        if exc.status == 404:
            return None
        raise
    return json.loads((cm.data or {}).get(c.ENGINE_CONFIG_KEY, "null"))


def _image(dep: Any) -> str:
    return str(dep.spec.template.spec.containers[0].image)


def test_deleted_and_edited_children_are_put_back(kubellm_operator: Any, op_namespace: str, k8s_cluster: Any) -> None:
    api = k8s_cluster.api_client()
    ns = op_namespace
    _create(api, ns, "drift", {"model": {"source": SOURCE}, "replicas": 2, "resources": {"gpus": 0}})
    first = wait_until(lambda: _deployment(api, ns, "drift"), timeout=60, what="the Deployment")

    # Deleted by hand -> re-created (a new object: a new uid).
    k8s_cluster.kubectl("delete", "deployment", "drift", "-n", ns, "--wait=false")
    wait_until(
        lambda: (d := _deployment(api, ns, "drift")) is not None and d.metadata.uid != first.metadata.uid,
        timeout=30,
        what="the deleted Deployment to be re-created",
    )

    # `kubectl scale deploy` (the scale subresource, another manager) -> spec.replicas back to 2.
    k8s_cluster.kubectl("scale", "deployment", "drift", "-n", ns, "--replicas=5")
    wait_until(lambda: _deployment(api, ns, "drift").spec.replicas == 2, timeout=30, what="replicas reverted to 2")

    # A new image by hand -> the operator's image again.
    k8s_cluster.kubectl("set", "image", "deployment/drift", "-n", ns, "runtime=example.com/other:1")
    wait_until(lambda: _image(_deployment(api, ns, "drift")) == IMAGE, timeout=30, what="the image reverted")

    # The engine ConfigMap edited -> its content restored; the Service deleted -> re-created.
    patch = json.dumps({"data": {c.ENGINE_CONFIG_KEY: "{}"}})
    k8s_cluster.kubectl("patch", "configmap", "drift-engine", "-n", ns, "--type=merge", "-p", patch)
    wait_until(
        lambda: (_engine_json(api, ns, "drift") or {}).get("engine", {}).get("max_num_seqs") == 256,
        timeout=30,
        what="the ConfigMap restored",
    )
    k8s_cluster.kubectl("delete", "service", "drift", "-n", ns, "--wait=false")
    core: Any = client.CoreV1Api(api)

    def service_back() -> bool:
        try:
            return bool(core.read_namespaced_service("drift", ns).metadata.deletion_timestamp is None)
        except client.ApiException as exc:
            if exc.status == 404:
                return False
            raise

    wait_until(service_back, timeout=30, what="the Service re-created")
    # A write to a field the operator does not own is left alone (and not fought over).
    k8s_cluster.kubectl("annotate", "deployment", "drift", "-n", ns, "team/owner=ml")
    wait_until(
        lambda: _deployment(api, ns, "drift").metadata.annotations.get("team/owner") == "ml",
        timeout=10,
        what="the foreign annotation",
    )
    assert _deployment(api, ns, "drift").spec.replicas == 2
    api.close()


def test_drift_while_the_operator_is_down_is_corrected_at_start(
    k8s_cluster: Any, private_namespace: str, tmp_path: Path, operator_process_factory: Any
) -> None:
    api = k8s_cluster.api_client()
    ns = private_namespace
    op = operator_process_factory(ns, tmp_path / "operator.log").start()
    _create(api, ns, "down", {"model": {"source": SOURCE}, "replicas": 1, "resources": {"gpus": 0}})
    wait_until(lambda: _deployment(api, ns, "down"), timeout=60, what="the Deployment")
    op.kill()
    # Nothing changes in the LLMDeployment; its Deployment is edited while nobody watches.
    k8s_cluster.kubectl("scale", "deployment", "down", "-n", ns, "--replicas=3")
    k8s_cluster.kubectl("set", "image", "deployment/down", "-n", ns, "runtime=example.com/other:1")
    assert _deployment(api, ns, "down").spec.replicas == 3
    op.start()
    wait_until(
        lambda: (d := _deployment(api, ns, "down")).spec.replicas == 1 and _image(d) == IMAGE,
        timeout=60,
        what="replicas and image reverted after the restart",
    )
    api.close()

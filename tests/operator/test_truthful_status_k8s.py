"""Truthful status against the real API server: a spec the CRD accepts but the Deployment apply refuses keeps
Degraded=True (with the API server's message) and observedGeneration where it was until an apply succeeds; status
writes carry a resourceVersion, and a writer that lost a race recomputes from what is there now."""

from __future__ import annotations

import time
from typing import Any

import pytest
from cluster import wait_until
from kubernetes import client

from kubellm.operator import constants as c
from kubellm.operator.apply import Kube

pytestmark = pytest.mark.k8s

SOURCE = "builtin:smollm2-135m-instruct"


def _get(api: Any, namespace: str, name: str) -> dict[str, Any]:
    custom: Any = client.CustomObjectsApi(api)
    return dict(custom.get_namespaced_custom_object(c.GROUP, c.VERSION, namespace, c.PLURAL, name))


def _patch(api: Any, namespace: str, name: str, body: Any) -> None:
    custom: Any = client.CustomObjectsApi(api)
    custom.patch_namespaced_custom_object(c.GROUP, c.VERSION, namespace, c.PLURAL, name, body)


def _create(api: Any, namespace: str, name: str, spec: dict[str, Any]) -> None:
    body = {"apiVersion": c.API_VERSION, "kind": c.KIND, "metadata": {"name": name}, "spec": spec}
    client.CustomObjectsApi(api).create_namespaced_custom_object(c.GROUP, c.VERSION, namespace, c.PLURAL, body)


def _degraded(obj: dict[str, Any]) -> dict[str, Any]:
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond["type"] == c.CONDITION_DEGRADED:
            return dict(cond)
    return {}


def test_refused_apply_keeps_degraded_until_fixed(kubellm_operator: Any, op_namespace: str, k8s_cluster: Any) -> None:
    api = k8s_cluster.api_client()
    ns = op_namespace
    _create(api, ns, "tol", {"model": {"source": SOURCE}, "resources": {"gpus": 0}})
    wait_until(
        lambda: (_get(api, ns, "tol").get("status") or {}).get("observedGeneration") == 1,
        timeout=60,
        what="generation 1 applied",
    )
    # Free-form in the CRD (the API server validates tolerations when the Deployment is applied): refused there.
    _patch(api, ns, "tol", {"spec": {"resources": {"tolerations": [{"key": "a", "operator": "Nope"}]}}})

    def refused() -> dict[str, Any] | None:
        obj = _get(api, ns, "tol")
        return obj if _degraded(obj).get("reason") == "ApplyFailed" else None

    obj = wait_until(refused, timeout=30, what="Degraded=True/ApplyFailed")
    degraded = _degraded(obj)
    assert degraded["status"] == "True"
    assert "Deployment" in degraded["message"] and "Unsupported value" in degraded["message"], degraded
    assert obj["metadata"]["generation"] == 2 and obj["status"]["observedGeneration"] == 1
    # The status timer ticks every half second and the Deployment's events keep coming: over many ticks the
    # verdict stands, unchanged, and observedGeneration does not move.
    deadline = time.monotonic() + 4
    while time.monotonic() < deadline:
        now = _get(api, ns, "tol")
        assert _degraded(now) == degraded and now["status"]["observedGeneration"] == 1, now["status"]
        time.sleep(0.5)
    _patch(api, ns, "tol", {"spec": {"resources": {"tolerations": []}}})
    fixed = wait_until(
        lambda: (o := _get(api, ns, "tol"))["status"].get("observedGeneration") == 3 and o,
        timeout=30,
        what="generation 3 applied",
    )
    assert _degraded(fixed)["status"] == "False", _degraded(fixed)
    api.close()


def test_status_writes_carry_the_resource_version(k8s_cluster: Any, private_namespace: str) -> None:
    """No operator watches this namespace: Kube.update_status alone, against the API server."""
    api = k8s_cluster.api_client()
    ns = private_namespace
    _create(api, ns, "rv", {"model": {"source": SOURCE}})
    stale = _get(api, ns, "rv")
    kube = Kube(api)
    kube.patch_status(ns, "rv", {"ready": "0/1"})  # another writer, after `stale` was read
    seen: list[dict[str, Any]] = []

    def compute(status: dict[str, Any]) -> dict[str, Any]:
        seen.append(status)
        return {"desiredReplicas": 1} if status.get("ready") == "0/1" else {"ready": "overwritten"}

    assert kube.update_status(ns, "rv", stale, compute)
    assert [s.get("ready") for s in seen] == [None, "0/1"], "the stale write was refused and recomputed"
    status = _get(api, ns, "rv")["status"]
    assert status["ready"] == "0/1" and status["desiredReplicas"] == 1
    # An empty patch writes nothing: the resourceVersion stays.
    version = _get(api, ns, "rv")["metadata"]["resourceVersion"]
    assert not kube.update_status(ns, "rv", _get(api, ns, "rv"), lambda s: {})
    assert _get(api, ns, "rv")["metadata"]["resourceVersion"] == version
    api.close()

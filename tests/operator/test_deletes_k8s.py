"""No stuck deletes: the operator puts no finalizer on an LLMDeployment, so deleting one completes whether the
operator runs or not; one left behind by an older version (which had a kopf timer) is taken off at start."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from cluster import wait_until
from kubernetes import client

from kubellm.operator import constants as c

pytestmark = pytest.mark.k8s

SOURCE = "builtin:smollm2-135m-instruct"
OLD_FINALIZER = f"{c.KOPF_ANNOTATION_PREFIX}/finalizer"


def _create(api: Any, namespace: str, name: str, finalizers: list[str] | None = None) -> None:
    meta: dict[str, Any] = {"name": name}
    if finalizers:
        meta["finalizers"] = finalizers
    body = {"apiVersion": c.API_VERSION, "kind": c.KIND, "metadata": meta, "spec": {"model": {"source": SOURCE}}}
    client.CustomObjectsApi(api).create_namespaced_custom_object(c.GROUP, c.VERSION, namespace, c.PLURAL, body)


def _get(api: Any, namespace: str, name: str) -> dict[str, Any] | None:
    try:
        custom: Any = client.CustomObjectsApi(api)
        return dict(custom.get_namespaced_custom_object(c.GROUP, c.VERSION, namespace, c.PLURAL, name))
    except client.ApiException as exc:
        if exc.status == 404:
            return None
        raise


def test_delete_completes_with_the_operator_stopped(
    k8s_cluster: Any, private_namespace: str, tmp_path: Path, operator_process_factory: Any
) -> None:
    api = k8s_cluster.api_client()
    ns = private_namespace
    op = operator_process_factory(ns, tmp_path / "operator.log").start()
    _create(api, ns, "orphan")
    # Reconciled (and the autoscaling/status loop has seen it), and no finalizer on it.
    obj = wait_until(
        lambda: (o := _get(api, ns, "orphan")) and (o.get("status") or {}).get("observedGeneration") == 1 and o,
        timeout=60,
        what="reconciled",
    )
    assert not obj["metadata"].get("finalizers"), obj["metadata"]
    op.stop()
    k8s_cluster.kubectl("delete", "llmdeployment", "orphan", "-n", ns, "--wait=true", "--timeout=30s", timeout=45)
    assert _get(api, ns, "orphan") is None
    # The garbage collector takes the children.
    apps: Any = client.AppsV1Api(api)
    wait_until(
        lambda: not apps.list_namespaced_deployment(ns, label_selector=f"{c.LABEL_INSTANCE}=orphan").items,
        timeout=60,
        what="the Deployment garbage-collected",
    )
    api.close()


def test_an_old_finalizer_is_taken_off_at_start(
    k8s_cluster: Any, private_namespace: str, tmp_path: Path, operator_process_factory: Any
) -> None:
    api = k8s_cluster.api_client()
    ns = private_namespace
    _create(api, ns, "legacy", finalizers=[OLD_FINALIZER])
    op = operator_process_factory(ns, tmp_path / "operator.log").start()
    wait_until(
        lambda: not ((_get(api, ns, "legacy") or {}).get("metadata") or {}).get("finalizers"),
        timeout=60,
        what="the old finalizer removed",
    )
    op.stop()
    k8s_cluster.kubectl("delete", "llmdeployment", "legacy", "-n", ns, "--wait=true", "--timeout=30s", timeout=45)
    api.close()

"""The control plane fails under the operator, and the operator carries on (issue #17's fault cases): the
kube-apiserver crashes (SIGKILL) and comes back, then etcd crashes under the apiserver and comes back. Each time the
same operator process, never restarted, reconciles what changed after the fault (an update and a new object), keeps
what was there before, and creates nothing twice.

These tests crash components, so they run on a control plane of their own (`private_cluster`), never the session's.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from cluster import wait_until
from e2e.operator_process import OperatorProcess
from kubernetes import client

from kubellm.operator import constants as c

pytestmark = [pytest.mark.k8s, pytest.mark.slow]

SPEC = {"model": {"source": "builtin:smollm2-135m-instruct"}, "replicas": 1, "resources": {"gpus": 0}}


@pytest.fixture(scope="module")
def setting(private_cluster: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, str, Any]]:
    """(cluster, namespace, operator): one operator for the module, watching one namespace."""
    with private_cluster.namespace("faults-") as namespace:
        log = tmp_path_factory.mktemp("faults") / "operator.log"
        op = OperatorProcess(namespace, private_cluster.env(), log).start()
        try:
            yield private_cluster, namespace, op
        finally:
            op.stop()


def _custom(api: Any) -> Any:
    return client.CustomObjectsApi(api)


def _create(api: Any, namespace: str, name: str) -> None:
    body = {"apiVersion": c.API_VERSION, "kind": c.KIND, "metadata": {"name": name}, "spec": SPEC}
    _custom(api).create_namespaced_custom_object(c.GROUP, c.VERSION, namespace, c.PLURAL, body)


def _converged(api: Any, namespace: str, name: str, replicas: int) -> bool:
    """The operator has applied the newest generation: its Deployment asks for `replicas`, and status says so."""
    try:
        obj = _custom(api).get_namespaced_custom_object(c.GROUP, c.VERSION, namespace, c.PLURAL, name)
        deployment = client.AppsV1Api(api).read_namespaced_deployment(name, namespace)
    except client.ApiException as exc:
        if exc.status in (404, 500, 503, 504):  # not made yet, or the control plane is still coming back
            return False
        raise
    status = obj.get("status") or {}
    return bool(
        deployment.spec.replicas == replicas
        and status.get("observedGeneration") == obj["metadata"]["generation"]
        and status.get("replicas") == replicas
    )


def _owned_deployments(api: Any, namespace: str) -> list[str]:
    selector = f"{c.LABEL_MANAGED_BY}={c.MANAGED_BY}"
    items: list[Any] = client.AppsV1Api(api).list_namespaced_deployment(namespace, label_selector=selector).items
    return sorted(d.metadata.name for d in items)


def _scale(api: Any, namespace: str, name: str, replicas: int) -> None:
    patch = {"spec": {"replicas": replicas}}
    _custom(api).patch_namespaced_custom_object(c.GROUP, c.VERSION, namespace, c.PLURAL, name, patch)


def _carries_on(cluster: Any, namespace: str, op: OperatorProcess, fault: str, new: str, before: list[str]) -> None:
    """After `fault` was restarted: scale the first object to 2 and create `new`; both converge, the objects from
    before are all still there, and the operator process never exited."""
    api = cluster.api_client()
    try:
        # After an etcd crash the apiserver reports it unhealthy until its storage client reconnects.
        wait_until(lambda: cluster.get("/readyz")[0] == 200, timeout=60, what="kube-apiserver /readyz after " + fault)
        _scale(api, namespace, before[0], 2)
        _create(api, namespace, new)

        def converged() -> bool:
            assert op.running, f"the operator exited:\n{op.log_tail()}"
            return _converged(api, namespace, before[0], 2) and _converged(api, namespace, new, 1)

        try:
            wait_until(converged, timeout=90, what=f"the operator to reconcile the changes made after {fault}")
        except TimeoutError as exc:
            raise AssertionError(f"{exc}\n--- operator\n{op.log_tail()}") from None
        assert _owned_deployments(api, namespace) == sorted([*before, new])
        assert all(_converged(api, namespace, name, 2 if name == before[0] else 1) for name in before)
    finally:
        api.close()


def test_apiserver_crash_under_the_operator(setting: tuple[Any, str, OperatorProcess]) -> None:
    cluster, namespace, op = setting
    api = cluster.api_client()
    try:
        _create(api, namespace, "a")
        wait_until(lambda: _converged(api, namespace, "a", 1), timeout=60, what="the first LLMDeployment's children")
    finally:
        api.close()
    cluster.restart("kube-apiserver")
    _carries_on(cluster, namespace, op, "the apiserver crash", "b", ["a"])


def test_etcd_crash_under_the_apiserver(setting: tuple[Any, str, OperatorProcess]) -> None:
    cluster, namespace, op = setting
    api = cluster.api_client()
    try:
        before = _owned_deployments(api, namespace)
        if not before:  # run alone: make the object the first test would have left
            _create(api, namespace, "a")
            wait_until(lambda: _converged(api, namespace, "a", 1), timeout=60, what="the first LLMDeployment")
            before = ["a"]
        for name in before[1:]:
            _scale(api, namespace, name, 1)
        _scale(api, namespace, before[0], 1)
        wait_until(
            lambda: all(_converged(api, namespace, name, 1) for name in before), timeout=60, what="one replica each"
        )
    finally:
        api.close()
    cluster.restart("etcd")
    _carries_on(cluster, namespace, op, "the etcd crash", "c", before)

"""The operator SIGKILLed (or SIGTERMed) mid-reconcile and restarted converges: every LLMDeployment ends with
exactly its own children, up to date, and nothing orphaned or duplicated."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from cluster import wait_until
from kubernetes import client, watch

from kubellm.operator import constants as c

pytestmark = [pytest.mark.k8s, pytest.mark.slow]

COUNT = 32  # enough that applying them all outlasts the watch event that triggers the kill


def _managed(api: Any, namespace: str) -> dict[str, list[Any]]:
    selector = f"{c.LABEL_MANAGED_BY}={c.MANAGED_BY}"
    core: Any = client.CoreV1Api(api)
    apps: Any = client.AppsV1Api(api)
    policy: Any = client.PolicyV1Api(api)
    return {
        "ConfigMap": core.list_namespaced_config_map(namespace, label_selector=selector).items,
        "Deployment": apps.list_namespaced_deployment(namespace, label_selector=selector).items,
        "Service": core.list_namespaced_service(namespace, label_selector=selector).items,
        "PodDisruptionBudget": policy.list_namespaced_pod_disruption_budget(namespace, label_selector=selector).items,
    }


def _hash(deployment: Any) -> str:
    return str((deployment.spec.template.metadata.annotations or {}).get(c.ANNOTATION_CONFIG_HASH))


def _runs_32(core: Any, deployment: Any) -> bool:
    """The Deployment's pod template runs the ConfigMap content with engine.max_num_seqs 32 (by the config hash,
    which is what rolls the pods: the settings themselves are in the ConfigMap)."""
    from kubellm.operator.resources import config_hash

    meta = deployment.metadata
    try:
        cm = core.read_namespaced_config_map(f"{meta.name}-engine", meta.namespace)
    except client.ApiException:
        return False
    engine = json.loads((cm.data or {}).get(c.ENGINE_CONFIG_KEY, "{}")).get("engine", {})
    return bool(engine.get("max_num_seqs") == 32 and config_hash({"data": cm.data}) == _hash(deployment))


def _first_event(list_fn: Any, namespace: str, predicate: Any = None, timeout: int = 60) -> Any:
    """Block until the watch sees a managed object (matching predicate, if given); return it."""
    stream = watch.Watch()
    selector = f"{c.LABEL_MANAGED_BY}={c.MANAGED_BY}"
    for event in stream.stream(list_fn, namespace, label_selector=selector, timeout_seconds=timeout):
        if predicate is None or predicate(event["object"]):
            stream.stop()
            return event["object"]
    raise AssertionError(f"no matching object within {timeout} s")


def _create(custom: Any, namespace: str, names: list[str]) -> None:
    for name in names:
        body = {
            "apiVersion": c.API_VERSION,
            "kind": c.KIND,
            "metadata": {"name": name},
            "spec": {"model": {"source": "builtin:smollm2-135m-instruct"}, "replicas": 2, "resources": {"gpus": 0}},
        }
        custom.create_namespaced_custom_object(c.GROUP, c.VERSION, namespace, c.PLURAL, body)


def _converged(api: Any, namespace: str, names: list[str], max_num_seqs_32: bool) -> bool:
    custom: Any = client.CustomObjectsApi(api)
    apps: Any = client.AppsV1Api(api)
    core: Any = client.CoreV1Api(api)
    for name in names:
        obj = custom.get_namespaced_custom_object(c.GROUP, c.VERSION, namespace, c.PLURAL, name)
        status = obj.get("status") or {}
        if status.get("observedGeneration") != obj["metadata"]["generation"] or status.get("readyReplicas") != 2:
            return False
        if max_num_seqs_32 and not _runs_32(core, apps.read_namespaced_deployment(name, namespace)):
            return False
    return True


def _exactly_their_children(api: Any, namespace: str, names: list[str]) -> None:
    """Every LLMDeployment has its own children, each once, owned by it; no half-done kopf progress is left."""
    custom: Any = client.CustomObjectsApi(api)
    owners = {
        o["metadata"]["uid"]: o["metadata"]["name"]
        for o in custom.list_namespaced_custom_object(c.GROUP, c.VERSION, namespace, c.PLURAL)["items"]
    }
    expected_names = {
        "ConfigMap": {f"{n}-engine" for n in names},
        "Deployment": set(names),
        "Service": set(names),
        "PodDisruptionBudget": set(names),
    }
    for kind, objs in _managed(api, namespace).items():
        got = [o.metadata.name for o in objs]
        assert sorted(got) == sorted(expected_names[kind]), f"{kind}: duplicates or orphans: {got}"
        for obj in objs:
            (ref,) = obj.metadata.owner_references
            assert owners.get(ref.uid) == ref.name, f"{kind} {obj.metadata.name} is owned by a missing object"
    kept = (f"{c.KOPF_ANNOTATION_PREFIX}/last-handled-configuration", f"{c.KOPF_ANNOTATION_PREFIX}/kopf-managed")
    for name in names:
        obj = custom.get_namespaced_custom_object(c.GROUP, c.VERSION, namespace, c.PLURAL, name)
        leftovers = [k for k in obj["metadata"].get("annotations", {}) if k.startswith(c.KOPF_ANNOTATION_PREFIX)]
        assert not [k for k in leftovers if k not in kept], f"{name}: {leftovers}"


def _restart_until_converged(op: Any, api: Any, namespace: str, names: list[str], *, max_num_seqs_32: bool) -> None:
    """Start the operator again, wait until every LLMDeployment converged, stop it, and check its children."""
    op.start()
    try:
        wait_until(
            lambda: _converged(api, namespace, names, max_num_seqs_32),
            timeout=120,
            what="every LLMDeployment converged after the restart",
        )
    finally:
        op.stop()
    _exactly_their_children(api, namespace, names)


def test_sigkill_mid_reconcile_then_restart_converges(
    k8s_cluster: Any, private_namespace: str, tmp_path: Path, operator_process_factory: Any
) -> None:
    api = k8s_cluster.api_client()
    custom: Any = client.CustomObjectsApi(api)
    apps: Any = client.AppsV1Api(api)
    ns = private_namespace
    names = [f"m{i}" for i in range(COUNT)]
    _create(custom, ns, names)

    op = operator_process_factory(ns, tmp_path / "operator.log")
    # Kill on the first ConfigMap (a watch, so within milliseconds): its owner has the ConfigMap but not yet the
    # Deployment, and the other objects are mid-way or not started.
    op.start()
    _first_event(client.CoreV1Api(api).list_namespaced_config_map, ns)
    op.kill()
    state = _managed(api, ns)
    print(f"first kill: {len(state['ConfigMap'])} ConfigMaps, {len(state['Deployment'])} Deployments of {COUNT}")
    assert len(state["Deployment"]) < COUNT, "the kill did not land mid-reconcile: every Deployment was there"

    # A spec change while the operator is down, then restart, and kill again right after the first rollout starts.
    core: Any = client.CoreV1Api(api)
    for name in names:
        custom.patch_namespaced_custom_object(
            c.GROUP, c.VERSION, ns, c.PLURAL, name, {"spec": {"engine": {"maxNumSeqs": 32}}}
        )
    op.start()

    _first_event(apps.list_namespaced_deployment, ns, lambda d: _runs_32(core, d))
    op.kill()
    updated = sum(_runs_32(core, d) for d in _managed(api, ns)["Deployment"])
    print(f"second kill: {updated}/{COUNT} Deployments updated")
    assert updated < COUNT, "the second kill did not land mid-rollout: every Deployment was updated"

    _restart_until_converged(op, api, ns, names, max_num_seqs_32=True)
    api.close()


def test_sigterm_mid_reconcile_exits_cleanly_then_restart_converges(
    k8s_cluster: Any, private_namespace: str, tmp_path: Path, operator_process_factory: Any
) -> None:
    """SIGTERM (a rollout of the operator, a node drain) while it reconciles: it stops within its grace period with
    status 0, and the next operator finishes the work: nothing half-made is left, nothing is made twice."""
    api = k8s_cluster.api_client()
    custom: Any = client.CustomObjectsApi(api)
    ns = private_namespace
    names = [f"t{i}" for i in range(COUNT // 2)]
    _create(custom, ns, names)
    op = operator_process_factory(ns, tmp_path / "operator.log")
    op.start()
    _first_event(client.CoreV1Api(api).list_namespaced_config_map, ns)
    assert op.proc is not None
    op.proc.terminate()
    assert op.proc.wait(timeout=20) == 0, op.log_tail()
    state = _managed(api, ns)
    made = f"{len(state['ConfigMap'])} ConfigMaps, {len(state['Deployment'])} Deployments"
    print(f"after SIGTERM: {made} of {len(names)}")
    _restart_until_converged(op, api, ns, names, max_num_seqs_32=False)
    api.close()

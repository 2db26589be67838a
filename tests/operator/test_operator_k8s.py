"""The operator against the real control plane (etcd, kube-apiserver, controller-manager, scheduler, kwok nodes):
create, no-op reconcile, update, scale, delete, Pending-for-GPU, and the builtin/external autoscaling modes."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from cluster import wait_until
from kubernetes import client

from kubellm.operator import constants as c

pytestmark = pytest.mark.k8s

SOURCE = "builtin:smollm2-135m-instruct"


def create_llmd(api: client.ApiClient, namespace: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    body = {"apiVersion": c.API_VERSION, "kind": c.KIND, "metadata": {"name": name}, "spec": spec}
    custom: Any = client.CustomObjectsApi(api)
    return custom.create_namespaced_custom_object(c.GROUP, c.VERSION, namespace, c.PLURAL, body)


def get_llmd(api: client.ApiClient, namespace: str, name: str) -> dict[str, Any]:
    custom: Any = client.CustomObjectsApi(api)
    return custom.get_namespaced_custom_object(c.GROUP, c.VERSION, namespace, c.PLURAL, name)


def patch_llmd(api: client.ApiClient, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
    custom: Any = client.CustomObjectsApi(api)
    return custom.patch_namespaced_custom_object(c.GROUP, c.VERSION, namespace, c.PLURAL, name, patch)


def condition(obj: dict[str, Any], type_: str) -> dict[str, Any]:
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond["type"] == type_:
            return dict(cond)
    return {}


def get_or_none(read: Any, *args: Any) -> Any:
    try:
        return read(*args)
    except client.ApiException as exc:
        if exc.status == 404:
            return None
        raise


def children(api: client.ApiClient, namespace: str, name: str) -> dict[str, Any]:
    core: Any = client.CoreV1Api(api)
    apps: Any = client.AppsV1Api(api)
    policy: Any = client.PolicyV1Api(api)
    return {
        "ConfigMap": get_or_none(core.read_namespaced_config_map, f"{name}-engine", namespace),
        "Deployment": get_or_none(apps.read_namespaced_deployment, name, namespace),
        "Service": get_or_none(core.read_namespaced_service, name, namespace),
        "PodDisruptionBudget": get_or_none(policy.read_namespaced_pod_disruption_budget, name, namespace),
    }


def ready(api: client.ApiClient, namespace: str, name: str, replicas: int) -> dict[str, Any] | None:
    obj = get_llmd(api, namespace, name)
    status = obj.get("status") or {}
    ok = (
        condition(obj, "Ready").get("status") == "True"
        and status.get("readyReplicas") == replicas
        and status.get("observedGeneration") == obj["metadata"]["generation"]
    )
    return obj if ok else None


def test_create_makes_children_and_becomes_ready(kubellm_operator: Any, op_namespace: str, api: Any) -> None:
    spec = {"model": {"source": SOURCE}, "replicas": 2, "engine": {"maxNumSeqs": 64}}
    created = create_llmd(api, op_namespace, "smol", spec)
    uid = created["metadata"]["uid"]
    objs = wait_until(
        lambda: (o := children(api, op_namespace, "smol")) and all(o.values()) and o,
        timeout=60,
        what="ConfigMap, Deployment, Service and PDB",
    )
    for kind, obj in objs.items():
        (ref,) = obj.metadata.owner_references
        assert (ref.kind, ref.name, ref.uid, ref.controller) == ("LLMDeployment", "smol", uid, True), kind
        assert obj.metadata.labels[c.LABEL_MANAGED_BY] == c.MANAGED_BY
        # One field manager owns what the operator wrote.
        managers = {m.manager for m in obj.metadata.managed_fields if m.operation == "Apply"}
        assert managers == {c.FIELD_MANAGER}, kind
    deployment = objs["Deployment"]
    assert deployment.spec.replicas == 2
    container = deployment.spec.template.spec.containers[0]
    assert container.image == "ghcr.io/kubellm/runtime:test"
    assert container.args == ["serve", "--config", "/etc/kubellm/engine.json"]
    assert container.readiness_probe.http_get.path == "/ready"
    assert container.security_context.read_only_root_filesystem is True
    assert container.resources.limits == {"nvidia.com/gpu": "1"}
    assert objs["Service"].spec.ports[0].port == 8000
    assert objs["PodDisruptionBudget"].spec.max_unavailable == 1
    assert json.loads(objs["ConfigMap"].data["engine.json"])["engine"]["max_num_seqs"] == 64

    # kwok runs the pods on its GPU nodes and marks them Ready; the status follows.
    obj = wait_until(lambda: ready(api, op_namespace, "smol", 2), timeout=60, what="Ready with 2 replicas")
    status = obj["status"]
    assert status["ready"] == "2/2" and status["replicas"] == 2
    assert status["endpoint"] == f"http://smol.{op_namespace}.svc:8000"
    assert status["selector"] == "app.kubernetes.io/name=kubellm,app.kubernetes.io/instance=smol"
    assert condition(obj, "Degraded")["status"] == "False"
    assert condition(obj, "ScalingActive")["reason"] == "AutoscalingDisabled"

    # A reconcile that changes nothing writes nothing: trigger one (a label change is an update for kopf) and
    # check that it ran (kopf's last-handled annotation moved) while no child's resourceVersion did.
    before = {k: v.metadata.resource_version for k, v in children(api, op_namespace, "smol").items()}
    handled_key = f"{c.KOPF_ANNOTATION_PREFIX}/last-handled-configuration"
    handled_before = get_llmd(api, op_namespace, "smol")["metadata"]["annotations"][handled_key]
    patch_llmd(api, op_namespace, "smol", {"metadata": {"labels": {"touched": "yes"}}})
    wait_until(
        lambda: get_llmd(api, op_namespace, "smol")["metadata"]["annotations"][handled_key] != handled_before,
        timeout=30,
        what="the update to be handled",
    )
    after = {k: v.metadata.resource_version for k, v in children(api, op_namespace, "smol").items()}
    assert after == before


def test_update_rolls_out_and_scale_subresource_works(
    kubellm_operator: Any, op_namespace: str, api: Any, k8s_cluster: Any
) -> None:
    create_llmd(api, op_namespace, "roll", {"model": {"source": SOURCE}, "replicas": 1})
    wait_until(lambda: ready(api, op_namespace, "roll", 1), timeout=60, what="Ready")
    apps: Any = client.AppsV1Api(api)  # Any: the typed models make every field Optional
    first_hash = apps.read_namespaced_deployment("roll", op_namespace).spec.template.metadata.annotations[
        c.ANNOTATION_CONFIG_HASH
    ]

    # An engine change: new ConfigMap content, new pod template -> a rolling update to a new ReplicaSet.
    patch_llmd(api, op_namespace, "roll", {"spec": {"engine": {"maxNumSeqs": 8}}})

    def rolled() -> bool:
        d = apps.read_namespaced_deployment("roll", op_namespace)
        st = d.status
        return (
            d.spec.template.metadata.annotations[c.ANNOTATION_CONFIG_HASH] != first_hash
            and (st.observed_generation or 0) >= d.metadata.generation
            and st.updated_replicas == 1
            and st.replicas == 1
            and st.ready_replicas == 1
        )

    wait_until(rolled, timeout=60, what="the rolling update to complete")
    dep = apps.read_namespaced_deployment("roll", op_namespace)
    assert dep.spec.template.metadata.annotations[c.ANNOTATION_CONFIG_HASH] != first_hash
    selector = "app.kubernetes.io/instance=roll"
    replica_sets = apps.list_namespaced_replica_set(op_namespace, label_selector=selector).items
    assert len(replica_sets) == 2 and sorted(rs.spec.replicas for rs in replica_sets) == [0, 1]

    # `kubectl scale llmd` goes through the scale subresource; the Deployment and the PDB follow.
    k8s_cluster.kubectl("scale", "-n", op_namespace, "llmd/roll", "--replicas=3")
    wait_until(lambda: ready(api, op_namespace, "roll", 3), timeout=60, what="3 ready replicas")
    assert apps.read_namespaced_deployment("roll", op_namespace).spec.replicas == 3
    assert children(api, op_namespace, "roll")["PodDisruptionBudget"] is not None
    scale = json.loads(
        k8s_cluster.kubectl("get", "-n", op_namespace, "llmd/roll", "--subresource=scale", "-o", "json").stdout
    )
    assert scale["spec"]["replicas"] == 3 and scale["status"]["replicas"] == 3
    assert "app.kubernetes.io/instance=roll" in scale["status"]["selector"]
    k8s_cluster.kubectl("scale", "-n", op_namespace, "llmd/roll", "--replicas=1")
    wait_until(
        lambda: children(api, op_namespace, "roll")["PodDisruptionBudget"] is None,
        timeout=30,
        what="the PDB to go (one replica)",
    )
    printed = k8s_cluster.kubectl("get", "-n", op_namespace, "llmd").stdout
    assert "roll" in printed and SOURCE in printed


def test_delete_garbage_collects_children(kubellm_operator: Any, op_namespace: str, api: Any) -> None:
    create_llmd(api, op_namespace, "gone", {"model": {"source": SOURCE}, "replicas": 2})
    wait_until(lambda: all(children(api, op_namespace, "gone").values()), timeout=60, what="children")
    client.CustomObjectsApi(api).delete_namespaced_custom_object(c.GROUP, c.VERSION, op_namespace, c.PLURAL, "gone")
    wait_until(
        lambda: not any(children(api, op_namespace, "gone").values()),
        timeout=60,
        what="the garbage collector to remove every child",
    )


def test_pending_for_gpus_is_reported_and_not_chased(kubellm_operator: Any, op_namespace: str, api: Any) -> None:
    # 12 GPUs per replica: no kwok node has more than 8, so the pod stays Pending. Autoscaling is on, with a
    # minimum of 2: the operator brings replicas to 2 and must not keep adding more for the Pending pods.
    spec = {
        "model": {"source": SOURCE},
        "replicas": 1,
        "resources": {"gpus": 12},
        "autoscaling": {"enabled": True, "minReplicas": 2, "maxReplicas": 6, "evaluationPeriodSeconds": 1},
    }
    create_llmd(api, op_namespace, "big", spec)

    def limited() -> dict[str, Any] | None:
        obj = get_llmd(api, op_namespace, "big")
        cond = condition(obj, "ScalingLimited")
        return obj if cond.get("status") == "True" and cond.get("reason") == "InsufficientGPU" else None

    obj = wait_until(limited, timeout=60, what="ScalingLimited=True/InsufficientGPU")
    assert "Insufficient nvidia.com/gpu" in condition(obj, "ScalingLimited")["message"]
    assert condition(obj, "Ready")["status"] == "False"
    assert obj["status"]["pendingReplicas"] >= 1
    # Several evaluations later replicas are still the minimum (2), not growing.
    wait_until(
        lambda: get_llmd(api, op_namespace, "big")["status"].get("pendingReplicas") == 2,
        timeout=30,
        what="both pods Pending",
    )
    # An invariant over a window of about five evaluations (one per second): replicas never grow past 2.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        assert get_llmd(api, op_namespace, "big")["spec"]["replicas"] == 2
        time.sleep(0.5)
    assert get_llmd(api, op_namespace, "big")["spec"]["replicas"] == 2


def test_external_mode_never_writes_replicas(kubellm_operator: Any, op_namespace: str, api: Any) -> None:
    # The same out-of-range replicas under both modes: builtin corrects it (min 2), external leaves it to HPA/KEDA.
    auto = {"enabled": True, "minReplicas": 2, "maxReplicas": 4, "evaluationPeriodSeconds": 1}
    create_llmd(api, op_namespace, "inside", {"model": {"source": SOURCE}, "autoscaling": auto})
    create_llmd(
        api, op_namespace, "outside", {"model": {"source": SOURCE}, "autoscaling": {**auto, "mode": "external"}}
    )
    inside = wait_until(
        lambda: (
            (o := get_llmd(api, op_namespace, "inside"))
            and o["spec"]["replicas"] == 2
            and (o.get("status") or {}).get("scalingDecisions")
            and o
        ),
        timeout=60,
        what="scaled to the minimum of 2, and the decision recorded",
    )
    decision = inside["status"]["scalingDecisions"][-1]
    assert (decision["fromReplicas"], decision["toReplicas"]) == (1, 2)
    events = client.CoreV1Api(api).list_namespaced_event(op_namespace, field_selector="involvedObject.name=inside")
    assert any(e.reason == "ScaledUp" for e in events.items)
    outside = wait_until(
        lambda: (
            (o := get_llmd(api, op_namespace, "outside"))
            and condition(o, "ScalingActive").get("reason") == "ExternalAutoscaler"
            and o
        ),
        timeout=30,
        what="the external mode to be reported",
    )
    assert outside["spec"]["replicas"] == 1
    assert not outside["status"].get("scalingDecisions")
    # The operator's field manager never touched spec.replicas of the external one.
    for entry in outside["metadata"].get("managedFields") or []:
        if entry["manager"].startswith("kubellm") or entry["manager"] == "python":
            assert "f:replicas" not in json.dumps(entry.get("fieldsV1", {}).get("f:spec", {})), entry


def test_status_follows_deployment_events_not_the_timer(
    k8s_cluster: Any, private_namespace: str, api: Any, tmp_path: Any, operator_process_factory: Any
) -> None:
    """With the status timer slowed to a minute, Ready still shows within seconds: Deployment events drive it."""
    operator_process_factory(private_namespace, tmp_path / "operator.log", KUBELLM_TIMER_INTERVAL_SECONDS="60").start()
    create_llmd(api, private_namespace, "prompt", {"model": {"source": SOURCE}, "replicas": 2})
    # 30 s, half the timer's interval: Ready within it cannot be the timer's doing
    wait_until(lambda: ready(api, private_namespace, "prompt", 2), timeout=30, what="Ready without a timer tick")

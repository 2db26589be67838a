"""Models delivered once (storage.modelCache) against the real control plane: the claim and its loader Job, the
replicas held at 0 until the Job completes and then mounting the one claim read-only, a failed download shown with
its cause. kwok finishes the loader pods (tests/cluster/nodes.py: hf://kwok/fails fails as a missing repository
does); `kubellm download` itself is tested against a Hub-shaped server in tests/runtime/test_download.py."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from cluster import wait_until
from kubernetes import client

from kubellm.operator import constants as c

pytestmark = pytest.mark.k8s


@pytest.fixture
def storage_class(api: client.ApiClient) -> Iterator[str]:
    """A PersistentVolume of a class of its own for the claim to bind to (the test cluster has no provisioner)."""
    name = f"cache-{uuid.uuid4().hex[:8]}"
    core: Any = client.CoreV1Api(api)
    volume = {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {"name": name},
        "spec": {
            "capacity": {"storage": "10Gi"},
            "accessModes": ["ReadWriteMany"],
            "storageClassName": name,
            "hostPath": {"path": f"/tmp/{name}"},  # never mounted: kwok runs no container
        },
    }
    core.create_persistent_volume(volume)
    try:
        yield name
    finally:
        core.delete_persistent_volume(name)


def _create(api: client.ApiClient, ns: str, name: str, spec: dict[str, Any]) -> None:
    body = {"apiVersion": c.API_VERSION, "kind": c.KIND, "metadata": {"name": name}, "spec": spec}
    client.CustomObjectsApi(api).create_namespaced_custom_object(c.GROUP, c.VERSION, ns, c.PLURAL, body)


def _llmd(api: client.ApiClient, ns: str, name: str) -> dict[str, Any]:
    custom: Any = client.CustomObjectsApi(api)
    return dict(custom.get_namespaced_custom_object(c.GROUP, c.VERSION, ns, c.PLURAL, name))


def _condition(obj: dict[str, Any], type_: str) -> dict[str, Any]:
    return next((cond for cond in (obj.get("status") or {}).get("conditions") or [] if cond["type"] == type_), {})


def _spec(source: str, storage_class: str) -> dict[str, Any]:
    return {
        "model": {"source": source},
        "replicas": 2,
        "resources": {"gpus": 0},
        "storage": {"modelCache": {"size": "5Gi", "storageClassName": storage_class}},
    }


def test_the_model_is_downloaded_once_then_every_replica_mounts_it(
    kubellm_operator: Any, op_namespace: str, api: Any, storage_class: str
) -> None:
    ns, name = op_namespace, "cached"
    _create(api, ns, name, _spec("hf://org/model", storage_class))
    core: Any = client.CoreV1Api(api)
    batch: Any = client.BatchV1Api(api)
    apps: Any = client.AppsV1Api(api)
    claim = wait_until(
        lambda: core.read_namespaced_persistent_volume_claim(f"{name}-model", ns), timeout=60, what="the claim"
    )
    assert claim.spec.access_modes == ["ReadWriteMany"] and claim.spec.resources.requests["storage"] == "5Gi"
    (job,) = wait_until(lambda: batch.list_namespaced_job(ns).items, timeout=60, what="the loader Job")
    args = job.spec.template.spec.containers[0].args
    assert args[:2] == ["download", "hf://org/model"] and args[2] == "--dest"
    obj = wait_until(
        lambda: (o := _llmd(api, ns, name)).get("status", {}).get("readyReplicas") == 2 and o,
        timeout=90,
        what="two replicas Ready once the model is in the cache",
    )
    assert obj["status"]["model"]["phase"] == "Ready"
    assert batch.read_namespaced_job(job.metadata.name, ns).status.succeeded == 1
    engine = json.loads(core.read_namespaced_config_map(f"{name}-engine", ns).data[c.ENGINE_CONFIG_KEY])["engine"]
    assert engine["model"] == args[3], "the replicas load the folder the loader filled"
    pods = core.list_namespaced_pod(ns, label_selector=f"{c.LABEL_COMPONENT}={c.COMPONENT_RUNTIME}").items
    assert len(pods) == 2
    for pod in pods:
        (volume,) = [v for v in pod.spec.volumes if v.name == "model-cache"]
        assert (volume.persistent_volume_claim.claim_name, volume.persistent_volume_claim.read_only) == (
            f"{name}-model",
            True,
        )
        env = {e.name: e.value for e in pod.spec.containers[0].env}
        assert env.get("HF_HUB_OFFLINE") == "1"
    assert apps.read_namespaced_deployment(name, ns).spec.replicas == 2


def test_a_failed_download_holds_the_replicas_and_names_its_cause(
    kubellm_operator: Any, op_namespace: str, api: Any, storage_class: str
) -> None:
    ns, name = op_namespace, "missing"
    _create(api, ns, name, _spec("hf://kwok/fails", storage_class))
    obj = wait_until(
        lambda: (o := _llmd(api, ns, name)).get("status", {}).get("model", {}).get("phase") == "Failed" and o,
        timeout=90,
        what="status.model Failed",
    )
    degraded, ready = _condition(obj, "Degraded"), _condition(obj, "Ready")
    assert (degraded["status"], degraded["reason"]) == ("True", "DownloadFailed")
    assert "RepositoryNotFoundError" in degraded["message"], degraded
    assert (ready["status"], ready["reason"]) == ("False", "ModelDownloadFailed")
    apps: Any = client.AppsV1Api(api)
    assert apps.read_namespaced_deployment(name, ns).spec.replicas == 0, "no replica waits on a failed download"
    assert client.CoreV1Api(api).list_namespaced_pod(ns, label_selector=f"{c.LABEL_COMPONENT}=runtime").items == []


def test_an_oci_model_is_an_image_volume_the_api_server_admits(
    kubellm_operator: Any, op_namespace: str, api: Any
) -> None:
    """Image volumes (GA in 1.35) pass the API server's validation and Pod Security `restricted` (the namespace
    enforces it): the replicas come up Ready, each mounting the image read-only."""
    ns, name = op_namespace, "imaged"
    _create(api, ns, name, {"model": {"source": "oci://ghcr.io/org/llama-8b:v1"}, "resources": {"gpus": 0}})
    wait_until(lambda: _condition(_llmd(api, ns, name), "Ready").get("status") == "True", timeout=90, what="Ready")
    (pod,) = client.CoreV1Api(api).list_namespaced_pod(ns, label_selector=f"{c.LABEL_INSTANCE}={name}").items
    (volume,) = [v for v in pod.spec.volumes if v.name == "model"]
    assert volume.image.reference == "ghcr.io/org/llama-8b:v1"

"""Bad LLMDeployments are refused, with a message naming the field: by the pydantic models (no cluster) and by
the real API server, from the generated CRD's schema and CEL rules (`k8s`)."""

from __future__ import annotations

import json
from typing import Any

import pydantic
import pytest

from kubellm.operator.spec import LLMDeploymentSpec, check_name

SOURCE = "builtin:smollm2-135m-instruct"


def _spec(**sections: Any) -> dict[str, Any]:
    return {"model": {"source": SOURCE}, **sections}


# (id, metadata.name, spec, the field the API server's message must name)
INVALID: list[tuple[str, str, dict[str, Any], str]] = [
    ("missing-source", "m", {"model": {}}, "spec.model.source"),
    ("source-scheme", "m", {"model": {"source": "s3://bucket/model"}}, "spec.model.source"),
    ("source-pvc-no-path", "m", {"model": {"source": "pvc://claim"}}, "spec.model.source"),
    ("source-oci-no-repository", "m", {"model": {"source": "oci://ghcr.io"}}, "spec.model.source"),
    ("dtype", "m", {"model": {"source": SOURCE, "dtype": "int3"}}, "spec.model.dtype"),
    ("revision-not-hf", "m", {"model": {"source": SOURCE, "revision": "main"}}, "spec.model.revision"),
    ("max-model-len", "m", {"model": {"source": SOURCE, "maxModelLen": 8}}, "spec.model.maxModelLen"),
    ("block-size", "m", _spec(engine={"blockSize": 7}), "spec.engine.blockSize"),
    ("gpu-mem-high", "m", _spec(engine={"gpuMemoryUtilization": 1.5}), "spec.engine.gpuMemoryUtilization"),
    ("gpu-mem-zero", "m", _spec(engine={"gpuMemoryUtilization": 0}), "spec.engine.gpuMemoryUtilization"),
    (
        "batched-lt-seqs",
        "m",
        _spec(engine={"maxNumSeqs": 512, "maxNumBatchedTokens": 256}),
        "spec.engine.maxNumBatchedTokens",
    ),
    ("replicas-negative", "m", _spec(replicas=-1), "spec.replicas"),
    ("gpus-negative", "m", _spec(resources={"gpus": -1}), "spec.resources.gpus"),
    ("cpu-not-quantity", "m", _spec(resources={"cpu": "two"}), "spec.resources.cpu"),
    ("min-gt-max", "m", _spec(autoscaling={"minReplicas": 5, "maxReplicas": 2}), "spec.autoscaling.minReplicas"),
    ("autoscaling-mode", "m", _spec(autoscaling={"mode": "magic"}), "spec.autoscaling.mode"),
    (
        "kv-target",
        "m",
        _spec(autoscaling={"targetKVCacheUtilization": 1.5}),
        "spec.autoscaling.targetKVCacheUtilization",
    ),
    ("queue-target", "m", _spec(autoscaling={"targetQueueDepth": 0}), "spec.autoscaling.targetQueueDepth"),
    ("service-port", "m", _spec(service={"port": 70000}), "spec.service.port"),
    ("service-type", "m", _spec(service={"type": "Ingress"}), "spec.service.type"),
    ("auth-no-secret-name", "m", _spec(auth={"apiKeySecretRef": {}}), "spec.auth.apiKeySecretRef.name"),
    (
        "storage-both",
        "m",
        _spec(storage={"emptyDir": {}, "persistentVolumeClaim": {"claimName": "c"}}),
        "spec.storage.persistentVolumeClaim",
    ),
    ("reserved-pod-label", "m", _spec(pod={"labels": {"app.kubernetes.io/instance": "x"}}), "spec.pod.labels"),
    ("env-name", "m", _spec(pod={"env": [{"name": "1BAD", "value": "x"}]}), "spec.pod.env[0].name"),
    ("rollout-both-zero", "m", _spec(rollout={"maxSurge": 0, "maxUnavailable": 0}), "spec.rollout.maxSurge"),
    ("rollout-not-percent", "m", _spec(rollout={"maxSurge": "lots"}), "spec.rollout.maxSurge"),
    ("unknown-field", "m", _spec(replicaz=2), "spec.replicaz"),
    ("ranks-ne-gpus", "m", _spec(resources={"gpus": 2}, parallelism={"tensor": 4}), "spec.parallelism"),
    ("tensor-on-cpu", "m", _spec(resources={"gpus": 0}, parallelism={"tensor": 2}), "spec.parallelism.tensor"),
    (
        "nodes-not-dividing-ranks",
        "m",
        _spec(resources={"gpus": 0}, parallelism={"pipeline": 3, "nodes": 2}),
        "spec.parallelism.nodes",
    ),
    (
        "nodes-too-many",
        "m",
        _spec(resources={"gpus": 1}, parallelism={"pipeline": 65, "nodes": 65}),
        "spec.parallelism",
    ),
    ("name-not-dns1035", "1-model", _spec(), "metadata.name"),
    ("cache-needs-hf", "m", _spec(storage={"modelCache": {"size": "1Gi"}}), "spec.storage.modelCache"),
    (
        "cache-and-claim",
        "m",
        {
            "model": {"source": "hf://org/model"},
            "storage": {"modelCache": {"size": "1Gi"}, "persistentVolumeClaim": {"claimName": "mine"}},
        },
        "spec.storage.persistentVolumeClaim",
    ),
    ("cache-size", "m", {"model": {"source": "hf://org/m"}, "storage": {"modelCache": {"size": "lots"}}}, "size"),
    (
        "grouped-name-too-long",  # 48 characters: its groups' pods would carry a revision label over 63
        "m" * 48,
        _spec(resources={"gpus": 2}, parallelism={"tensor": 4, "nodes": 2}),
        "metadata.name",
    ),
]

FULL_SPEC: dict[str, Any] = {
    "model": {
        "source": "hf://HuggingFaceTB/SmolLM2-135M-Instruct",
        "revision": "main",
        "tokenSecretRef": {"name": "hf-token"},
        "dtype": "bfloat16",
        "maxModelLen": 4096,
        "chatTemplate": "{% for m in messages %}{{ m.content }}{% endfor %}",
        "servedModelName": "smollm2",
    },
    "replicas": 2,
    "engine": {
        "maxNumSeqs": 64,
        "maxNumBatchedTokens": 4096,
        "blockSize": 32,
        "gpuMemoryUtilization": 0.85,
        "enablePrefixCaching": False,
        "enforceEager": True,
        "extraArgs": ["--seed", "7"],
    },
    "resources": {
        "gpus": 2,
        "cpu": "4",
        "memory": "16Gi",
        "nodeSelector": {"nvidia.com/gpu.present": "true"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "llm", "effect": "NoSchedule"}],
        "affinity": {"nodeAffinity": {}},
        "priorityClassName": "high",
    },
    "image": {"name": "registry.example/kubellm:dev", "pullPolicy": "Always", "pullSecrets": ["regcred"]},
    "autoscaling": {
        "enabled": True,
        "mode": "builtin",
        "minReplicas": 1,
        "maxReplicas": 8,
        "targetQueueDepth": 2.5,
        "targetKVCacheUtilization": 0.7,
        "evaluationPeriodSeconds": 10,
        "tolerance": 0.05,
        "scaleUpStabilizationSeconds": 30,
        "scaleDownStabilizationSeconds": 120,
        "maxScaleUpStep": 2,
        "maxScaleDownStep": 1,
    },
    "service": {"type": "NodePort", "port": 80, "annotations": {"example.com/team": "ml"}},
    "auth": {"apiKeySecretRef": {"name": "api-keys", "key": "primary"}},
    "storage": {"emptyDir": {"sizeLimit": "20Gi"}},
    "pod": {
        "labels": {"team": "ml"},
        "annotations": {"example.com/owner": "ml"},
        "env": [{"name": "LOG_LEVEL", "value": "debug"}, {"name": "X", "valueFrom": {"fieldRef": {"fieldPath": "x"}}}],
    },
    "rollout": {"maxSurge": "25%", "maxUnavailable": 1},
    "parallelism": {"tensor": 1, "pipeline": 2},
}


def _leaf(field: str) -> str:
    return field.rsplit(".", 1)[-1].split("[")[0]


@pytest.mark.parametrize(("case", "name", "spec", "field"), INVALID, ids=[c[0] for c in INVALID])
def test_models_refuse(case: str, name: str, spec: dict[str, Any], field: str) -> None:
    if field == "metadata.name":
        with pytest.raises(ValueError, match=r"metadata\.name"):
            check_name(name, LLMDeploymentSpec.model_validate(spec))
        return
    with pytest.raises(pydantic.ValidationError) as info:
        LLMDeploymentSpec.model_validate(spec)
    assert _leaf(field) in str(info.value), f"{case}: {info.value}"


def test_models_accept_minimal_and_full() -> None:
    minimal = LLMDeploymentSpec.model_validate({"model": {"source": SOURCE}})
    assert minimal.replicas == 1 and minimal.resources.gpus == 1 and not minimal.autoscaling.enabled
    full = LLMDeploymentSpec.model_validate(FULL_SPEC)
    assert full.autoscaling.target_kv_cache_utilization == 0.7
    assert full.rollout.max_surge == "25%"
    # The wire form round-trips.
    assert LLMDeploymentSpec.model_validate(full.model_dump(by_alias=True)) == full
    check_name("smol")


def _manifest(name: str, spec: dict[str, Any]) -> str:
    return json.dumps(
        {"apiVersion": "kubellm.io/v1alpha1", "kind": "LLMDeployment", "metadata": {"name": name}, "spec": spec}
    )


@pytest.mark.k8s
def test_api_server_refuses_each_invalid_object(k8s_cluster: Any, k8s_namespace: str) -> None:
    for case, name, spec, field in INVALID:
        result = k8s_cluster.kubectl(
            "create", "-n", k8s_namespace, "--dry-run=server", "-f", "-", input=_manifest(name, spec), check=False
        )
        assert result.returncode != 0, f"{case}: the API server accepted it"
        assert field in result.stderr, f"{case}: the message does not name {field}: {result.stderr}"


@pytest.mark.k8s
def test_api_server_accepts_full_spec_and_defaults_match_models(k8s_cluster: Any, k8s_namespace: str) -> None:
    for name, spec in (("full", FULL_SPEC), ("minimal", {"model": {"source": SOURCE}})):
        out = k8s_cluster.kubectl(
            "create", "-n", k8s_namespace, "--dry-run=server", "-o", "json", "-f", "-", input=_manifest(name, spec)
        ).stdout
        stored = json.loads(out)["spec"]
        # What the API server stores (with its defaults) is what the models make of the object.
        assert LLMDeploymentSpec.model_validate(stored) == LLMDeploymentSpec.model_validate(spec)

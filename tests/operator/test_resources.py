"""resources.render: spec -> the ConfigMap, Deployment, Service and PDB, as plain dicts (no cluster)."""

from __future__ import annotations

import json
from typing import Any

from kubellm.operator import constants as c
from kubellm.operator.render import render
from kubellm.operator.resources import Owner, config_hash, model_argument, selector_string
from kubellm.operator.settings import Settings
from kubellm.operator.spec import LLMDeploymentSpec

OWNER = Owner(name="smol", namespace="ml", uid="0000-1111")
SETTINGS = Settings(runtime_image="example/kubellm:test", drain_seconds=45, prestop_sleep_seconds=5)


def _render(**spec: Any) -> Any:
    parsed = LLMDeploymentSpec.model_validate({"model": {"source": "builtin:smollm2-135m-instruct"}, **spec})
    return render(OWNER, parsed, SETTINGS)


def _container(objs: Any) -> dict[str, Any]:
    (container,) = objs.deployment["spec"]["template"]["spec"]["containers"]
    return container


def _flag(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args else None


def _config(objs: Any) -> dict[str, Any]:
    """The engine.json the container's `--config` reads: {"engine": {...}, "server": {...}}."""
    return dict(json.loads(objs.config_map["data"][c.ENGINE_CONFIG_KEY]))


def test_every_object_is_owned_labelled_and_namespaced() -> None:
    objs = _render(replicas=2)
    kinds = [o["kind"] for o in objs.to_apply()]
    assert kinds == ["ConfigMap", "Deployment", "Service", "PodDisruptionBudget"]
    for obj in objs.to_apply():
        meta = obj["metadata"]
        assert meta["namespace"] == "ml"
        (ref,) = meta["ownerReferences"]
        assert ref == {
            "apiVersion": "kubellm.io/v1alpha1",
            "kind": "LLMDeployment",
            "name": "smol",
            "uid": "0000-1111",
            "controller": True,
            "blockOwnerDeletion": True,
        }
        assert meta["labels"][c.LABEL_INSTANCE] == "smol"
        assert meta["labels"][c.LABEL_MANAGED_BY] == c.MANAGED_BY


def test_runtime_container_command_and_probes() -> None:
    objs = _render(
        engine={"maxNumSeqs": 32, "maxNumBatchedTokens": 1024, "blockSize": 32, "enablePrefixCaching": False},
        model={"source": "builtin:smollm2-135m-instruct", "maxModelLen": 2048, "dtype": "float16"},
    )
    container = _container(objs)
    assert container["image"] == "example/kubellm:test"
    assert container["command"] == ["kubellm"]
    # Every setting is in the mounted config file, by EngineConfig field name; no engine flag on the command line.
    assert container["args"] == ["serve", "--config", f"{c.CONFIG_MOUNT_PATH}/{c.ENGINE_CONFIG_KEY}"]
    engine, server = _config(objs)["engine"], _config(objs)["server"]
    assert engine == {
        "model": "builtin:smollm2-135m-instruct",
        "served_model_name": "smol",
        "dtype": "float16",
        "max_model_len": 2048,
        "block_size": 32,
        "max_num_seqs": 32,
        "max_num_batched_tokens": 1024,
        "gpu_memory_utilization": 0.9,
        "enable_prefix_caching": False,
        "enforce_eager": False,
    }
    assert (server["host"], server["port"]) == ("0.0.0.0", 8000)
    assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    startup = container["startupProbe"]
    # The startup probe covers the whole model-loading allowance before liveness may kill the pod.
    assert startup["periodSeconds"] * startup["failureThreshold"] >= SETTINGS.startup_timeout_seconds
    assert container["lifecycle"]["preStop"] == {"sleep": {"seconds": 5}}
    pod = objs.deployment["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 45
    # The runtime's drain fits in the grace period after the preStop pause.
    assert server["drain_timeout"] == 38
    assert container["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]


def test_hardened_security_context() -> None:
    objs = _render()
    pod = objs.deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    sc = _container(objs)["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    # A read-only root needs writable /tmp and cache mounts.
    mounts = {m["mountPath"] for m in _container(objs)["volumeMounts"]}
    assert {"/tmp", c.MODEL_CACHE_PATH, c.CONFIG_MOUNT_PATH} <= mounts


def test_no_fixed_uid_and_the_pod_security_context_is_overridable() -> None:
    pod = _render().deployment["spec"]["template"]["spec"]
    assert not {"runAsUser", "runAsGroup", "fsGroup"} & set(pod["securityContext"]), "OpenShift assigns UIDs"
    fleet = Settings(runtime_pod_security_context={"fsGroup": 1000, "runAsUser": 1000})
    spec = LLMDeploymentSpec.model_validate(
        {"model": {"source": "builtin:smollm2-135m-instruct"}, "pod": {"securityContext": {"runAsUser": 4242}}}
    )
    merged = render(OWNER, spec, fleet).deployment["spec"]["template"]["spec"]["securityContext"]
    assert merged == {
        "runAsNonRoot": True,
        "seccompProfile": {"type": "RuntimeDefault"},
        "fsGroup": 1000,  # the operator's setting
        "runAsUser": 4242,  # the spec's, over the setting
    }
    assert Settings.from_env(
        {"KUBELLM_RUNTIME_POD_SECURITY_CONTEXT": '{"fsGroup": 7}'}
    ).runtime_pod_security_context == {"fsGroup": 7}


def test_gpus_resources_tolerations_and_shm() -> None:
    one = _render()
    assert _container(one)["resources"]["limits"] == {"nvidia.com/gpu": "1"}
    assert all(m["mountPath"] != "/dev/shm" for m in _container(one)["volumeMounts"])
    two = _render(resources={"gpus": 2, "cpu": 4, "memory": "16Gi", "gpuResourceName": "amd.com/gpu"})
    res = _container(two)["resources"]
    assert res["limits"] == {"memory": "16Gi", "amd.com/gpu": "2"}
    assert res["requests"] == {"cpu": "4", "memory": "16Gi", "amd.com/gpu": "2"}
    pod = two.deployment["spec"]["template"]["spec"]
    assert {"key": "amd.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"] == {"medium": "Memory"}
    cpu_only = _render(resources={"gpus": 0})
    assert "tolerations" not in cpu_only.deployment["spec"]["template"]["spec"]
    assert "limits" not in _container(cpu_only)["resources"]


def test_gpus_are_tensor_parallel_ranks_unless_parallelism_says_otherwise() -> None:
    engine = _config(_render(resources={"gpus": 4}))["engine"]
    assert engine["tensor_parallel_size"] == 4 and "pipeline_parallel_size" not in engine
    split = _render(resources={"gpus": 4}, parallelism={"tensor": 2, "pipeline": 2})
    engine = _config(split)["engine"]
    assert (engine["tensor_parallel_size"], engine["pipeline_parallel_size"]) == (2, 2)
    assert any(v["name"] == "dshm" for v in split.deployment["spec"]["template"]["spec"]["volumes"])
    for one in (_render(), _render(resources={"gpus": 0})):
        assert {"tensor_parallel_size", "pipeline_parallel_size"}.isdisjoint(_config(one)["engine"])
    # a CPU replica may pipeline (gloo), never split layers without GPUs
    cpu = _config(_render(resources={"gpus": 0}, parallelism={"pipeline": 2}))["engine"]
    assert cpu["pipeline_parallel_size"] == 2


def test_prometheus_annotations_and_config_hash_rolls_pods() -> None:
    a = _render()
    annotations = a.deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == "8000"
    assert annotations["prometheus.io/path"] == "/metrics"
    assert annotations[c.ANNOTATION_CONFIG_HASH] == config_hash(a.config_map)
    b = _render(engine={"maxNumSeqs": 8})
    assert config_hash(a.config_map) != config_hash(b.config_map)
    engine = json.loads(b.config_map["data"][c.ENGINE_CONFIG_KEY])
    assert engine["engine"]["max_num_seqs"] == 8 and engine["engine"]["model"] == "builtin:smollm2-135m-instruct"
    # Rendering is deterministic: the same spec gives byte-identical objects (so applies are no-ops).
    assert _render().to_apply() == _render().to_apply()


def test_service_selector_and_pdb_only_for_several_replicas() -> None:
    objs = _render(service={"type": "NodePort", "port": 80, "annotations": {"a": "b"}})
    svc = objs.service
    assert svc["spec"]["type"] == "NodePort"
    assert svc["spec"]["ports"] == [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]
    assert svc["metadata"]["annotations"] == {"a": "b"}
    selector = objs.deployment["spec"]["selector"]["matchLabels"]
    assert svc["spec"]["selector"] == selector
    assert objs.deployment["spec"]["template"]["metadata"]["labels"].items() >= selector.items()
    assert selector_string("smol") == "app.kubernetes.io/name=kubellm,app.kubernetes.io/instance=smol"
    assert objs.pdb is None
    pdb = _render(replicas=3).pdb
    assert pdb is not None and pdb["spec"]["maxUnavailable"] == 1 and pdb["spec"]["selector"]["matchLabels"] == selector


def test_model_sources_auth_storage_env_and_overrides() -> None:
    assert model_argument("pvc://models/llama/8b") == "/models/models/llama/8b"
    assert model_argument("file:///data/model.gguf") == "/data/model.gguf"
    assert model_argument("hf://org/name") == "hf://org/name"
    assert model_argument("oci://ghcr.io/org/llama-8b:v1") == "/model-image"


def test_an_oci_model_is_an_image_volume() -> None:
    spec = LLMDeploymentSpec.model_validate({"model": {"source": "oci://ghcr.io/org/llama-8b:v1"}})
    pod = render(OWNER, spec, Settings()).deployment["spec"]["template"]["spec"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == "model"]
    assert volume["image"] == {"reference": "ghcr.io/org/llama-8b:v1", "pullPolicy": "IfNotPresent"}
    (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "model"]
    assert mount == {"name": "model", "mountPath": "/model-image", "readOnly": True}
    objs = _render(
        model={"source": "pvc://weights/smol", "chatTemplate": "{{ x }}"},
        auth={"apiKeySecretRef": {"name": "keys"}},
        storage={"persistentVolumeClaim": {"claimName": "cache"}},
        pod={"labels": {"team": "ml"}, "annotations": {"x": "y"}, "env": [{"name": "HF_HOME", "value": "/elsewhere"}]},
        image={"pullSecrets": ["regcred"], "pullPolicy": "Always"},
        rollout={"maxSurge": 0, "maxUnavailable": "50%"},
    )
    container = _container(objs)
    pod = objs.deployment["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["model"]["persistentVolumeClaim"] == {"claimName": "weights", "readOnly": True}
    assert volumes["model-cache"]["persistentVolumeClaim"] == {"claimName": "cache"}
    assert volumes["api-key"]["secret"] == {"secretName": "keys", "items": [{"key": "api-key", "path": "api-key"}]}
    config = _config(objs)
    assert config["engine"]["model"] == "/models/weights/smol"
    assert config["server"]["api_key_file"] == f"{c.API_KEY_MOUNT_PATH}/api-key"
    assert config["engine"]["chat_template"] == f"{c.CONFIG_MOUNT_PATH}/{c.CHAT_TEMPLATE_KEY}"
    assert objs.config_map["data"][c.CHAT_TEMPLATE_KEY] == "{{ x }}"
    env = {e["name"]: e for e in container["env"]}
    assert env["HF_HOME"]["value"] == "/elsewhere"  # the user's value wins, once
    assert [e["name"] for e in container["env"]].count("HF_HOME") == 1
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert container["imagePullPolicy"] == "Always"
    assert objs.deployment["spec"]["template"]["metadata"]["labels"]["team"] == "ml"
    assert objs.deployment["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": "50%"}
    hf = _render(model={"source": "hf://org/name", "revision": "v2", "tokenSecretRef": {"name": "tok"}})
    hf_container = _container(hf)
    assert _config(hf)["engine"]["revision"] == "v2"
    token = next(e for e in hf_container["env"] if e["name"] == "HF_TOKEN")
    assert token["valueFrom"] == {"secretKeyRef": {"name": "tok", "key": "token"}}


def test_extra_args_are_appended_verbatim() -> None:
    args = _container(_render(engine={"extraArgs": ["--seed", "3"]}))["args"]
    assert args[-2:] == ["--seed", "3"]

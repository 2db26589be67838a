"""PURE: an LLMDeployment spec -> the objects that run it (ConfigMap, Deployment, Service, PodDisruptionBudget);
groups.py renders the StatefulSets of replicas spanning several nodes, render.py puts them together.

Nothing here talks to the cluster: the renderers return plain dicts, shaped as server-side apply configurations
(only the fields the operator has an opinion on), with owner references so that deleting the LLMDeployment
garbage-collects them.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

from kubellm import contract
from kubellm.operator import constants as c
from kubellm.operator.settings import Settings
from kubellm.operator.spec import LLMDeploymentSpec

JSON = dict[str, Any]


@dataclass(frozen=True)
class Owner:
    """The LLMDeployment the objects belong to."""

    name: str
    namespace: str
    uid: str

    def reference(self) -> JSON:
        return {
            "apiVersion": c.API_VERSION,
            "kind": c.KIND,
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }


def selector_labels(name: str) -> dict[str, str]:
    return {c.LABEL_NAME: c.APP_NAME, c.LABEL_INSTANCE: name}


def selector_string(name: str, spec: LLMDeploymentSpec | None = None) -> str:
    """The label selector of the pods (status.selector, which the scale subresource gives HPA to count replicas
    by): with `spec`, of the pods that serve, one per replica."""
    labels = serving_selector(name, spec) if spec is not None else selector_labels(name)
    return ",".join(f"{k}={v}" for k, v in labels.items())


def common_labels(name: str) -> dict[str, str]:
    return {
        **selector_labels(name),
        c.LABEL_COMPONENT: c.COMPONENT_RUNTIME,
        c.LABEL_MANAGED_BY: c.MANAGED_BY,
        c.LABEL_PART_OF: c.APP_NAME,
    }


def config_map_name(name: str) -> str:
    return f"{name}-engine"


def model_cache_claim(name: str) -> str:
    """The PersistentVolumeClaim of storage.modelCache."""
    return f"{name}-model"


def served_model_name(name: str, spec: LLMDeploymentSpec) -> str:
    return spec.model.served_model_name or name


def endpoint(owner: Owner, spec: LLMDeploymentSpec) -> str:
    return f"http://{owner.name}.{owner.namespace}.svc:{spec.service.port}"


def object_metadata(
    owner: Owner, name: str, annotations: dict[str, str] | None = None, labels: dict[str, str] | None = None
) -> JSON:
    meta: JSON = {
        "name": name,
        "namespace": owner.namespace,
        "labels": {**common_labels(owner.name), **(labels or {})},
        "ownerReferences": [owner.reference()],
    }
    if annotations:
        meta["annotations"] = dict(annotations)
    return meta


def model_cache_key(owner: Owner, spec: LLMDeploymentSpec) -> str:
    """Names one download (storage.modelCache): of this LLMDeployment, this source and revision. A new source
    is a new loader Job (a Job's pod template cannot change) filling a new folder of the same claim."""
    blob = f"{owner.name}\n{spec.model.source}\n{spec.model.revision or ''}".encode()
    return hashlib.sha256(blob).hexdigest()[:10]


def model_cache_dir(owner: Owner, spec: LLMDeploymentSpec) -> str:
    """Where the loader Job puts the model, and where the replicas load it from (the claim is mounted at
    MODEL_CACHE_PATH)."""
    return f"{c.MODEL_CACHE_PATH}/models/{model_cache_key(owner, spec)}"


def engine_section(owner: Owner, spec: LLMDeploymentSpec) -> JSON:
    """The engine's settings, by EngineConfig field name (runtime/config.py; contract.check_engine_section
    validates them with that dataclass). Unset optional fields are left out: the runtime's defaults apply."""
    engine = spec.engine
    cached = spec.storage.model_cache is not None  # the replicas load the loader Job's folder, downloading nothing
    section: JSON = {
        "model": model_cache_dir(owner, spec) if cached else model_argument(spec.model.source),
        "revision": None if cached else spec.model.revision,
        "served_model_name": served_model_name(owner.name, spec),
        "dtype": spec.model.dtype,
        "max_model_len": spec.model.max_model_len,
        "block_size": engine.block_size,
        "max_num_seqs": engine.max_num_seqs,
        "max_num_batched_tokens": engine.max_num_batched_tokens,
        "gpu_memory_utilization": engine.gpu_memory_utilization,
        "enable_prefix_caching": engine.enable_prefix_caching,
        "enforce_eager": engine.enforce_eager,
    }
    # one rank per GPU of the replica (runtime/distributed): the defaults (1) are left out
    if spec.tensor_parallel_size() > 1:
        section["tensor_parallel_size"] = spec.tensor_parallel_size()
    if spec.pipeline_parallel_size() > 1:
        section["pipeline_parallel_size"] = spec.pipeline_parallel_size()
    if spec.model.chat_template is not None:
        section["chat_template"] = f"{c.CONFIG_MOUNT_PATH}/{c.CHAT_TEMPLATE_KEY}"
    return {k: v for k, v in section.items() if v is not None}


def server_section(spec: LLMDeploymentSpec, settings: Settings) -> JSON:
    """`kubellm serve`'s other flags (by argparse dest) that the pod needs."""
    section: JSON = {"host": "0.0.0.0", "port": c.CONTAINER_PORT, "drain_timeout": drain_timeout(settings)}
    if spec.auth is not None:
        section["api_key_file"] = f"{c.API_KEY_MOUNT_PATH}/api-key"
    return section


def engine_config(owner: Owner, spec: LLMDeploymentSpec, settings: Settings) -> JSON:
    """The file `kubellm serve --config` reads (kept in the ConfigMap, readable with kubectl): everything the
    runtime needs but the extra arguments, which stay flags."""
    return {
        contract.CONFIG_ENGINE_SECTION: engine_section(owner, spec),
        contract.CONFIG_SERVER_SECTION: server_section(spec, settings),
    }


def render_config_map(owner: Owner, spec: LLMDeploymentSpec, settings: Settings) -> JSON:
    text = json.dumps(engine_config(owner, spec, settings), indent=2, sort_keys=True) + "\n"
    data = {c.ENGINE_CONFIG_KEY: text}
    if spec.model.chat_template is not None:
        data[c.CHAT_TEMPLATE_KEY] = spec.model.chat_template
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": object_metadata(owner, config_map_name(owner.name)),
        "data": data,
    }


def config_hash(config_map: JSON) -> str:
    blob = json.dumps(config_map["data"], sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def model_argument(source: str) -> str:
    """The `--model` value inside the pod: pvc://, oci:// and file:// become local paths, the rest pass through."""
    if source.startswith("oci://"):
        return c.MODELS_OCI_MOUNT_PATH
    if source.startswith("pvc://"):
        claim, _, path = source.removeprefix("pvc://").partition("/")
        return f"{c.MODELS_PVC_MOUNT_ROOT}/{claim}/{path}"
    if source.startswith("file://"):
        return source.removeprefix("file://")
    return source


def drain_timeout(settings: Settings) -> int:
    """What the runtime gets to finish in-flight requests after SIGTERM: the grace period, less the preStop pause
    (it runs first, inside the same grace period) and a margin so the kubelet's SIGKILL never cuts a response."""
    return max(1, settings.drain_seconds - settings.prestop_sleep_seconds - 2)


def runtime_args(spec: LLMDeploymentSpec) -> list[str]:
    """Everything is in the mounted config file (one source); spec.engine.extraArgs follow as flags, which the
    runtime lets override the file."""
    return ["serve", "--config", f"{c.CONFIG_MOUNT_PATH}/{c.ENGINE_CONFIG_KEY}", *spec.engine.extra_args]


def _env(spec: LLMDeploymentSpec) -> list[JSON]:
    # HOME and the Hugging Face cache must be writable: the root filesystem is read-only.
    env: list[JSON] = [{"name": "HOME", "value": "/tmp"}]
    if spec.storage.model_cache is not None:
        # The model is on the read-only claim the loader Job filled: nothing may reach for the Hub.
        env += [{"name": "HF_HOME", "value": "/tmp/huggingface"}, {"name": "HF_HUB_OFFLINE", "value": "1"}]
    else:
        env.append({"name": "HF_HOME", "value": f"{c.MODEL_CACHE_PATH}/huggingface"})
    token = spec.model.token_secret_ref
    if token is not None:
        env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": token.name, "key": token.key}}})
    # The user's variables win; server-side apply treats env as a map keyed by name, so no duplicates.
    user = [v.model_dump(by_alias=True, exclude_none=True) for v in spec.pod.env]
    user_names = {v["name"] for v in user}
    return [v for v in env if v["name"] not in user_names] + user


def _volumes(owner: Owner, spec: LLMDeploymentSpec) -> tuple[list[JSON], list[JSON]]:
    volumes: list[JSON] = [
        {"name": "config", "configMap": {"name": config_map_name(owner.name)}},
        {"name": "tmp", "emptyDir": {}},
    ]
    storage = spec.storage
    cache_mount: JSON = {"name": "model-cache", "mountPath": c.MODEL_CACHE_PATH}
    mounts: list[JSON] = [
        {"name": "config", "mountPath": c.CONFIG_MOUNT_PATH, "readOnly": True},
        {"name": "tmp", "mountPath": "/tmp"},
        {**cache_mount, "readOnly": True} if storage.model_cache is not None else cache_mount,
    ]
    if storage.model_cache is not None:
        claim = {"claimName": model_cache_claim(owner.name), "readOnly": True}
        volumes.append({"name": "model-cache", "persistentVolumeClaim": claim})
    elif storage.persistent_volume_claim is not None:
        volumes.append(
            {"name": "model-cache", "persistentVolumeClaim": {"claimName": storage.persistent_volume_claim.claim_name}}
        )
    else:
        size = storage.empty_dir.size_limit if storage.empty_dir is not None else None
        volumes.append({"name": "model-cache", "emptyDir": {"sizeLimit": str(size)} if size is not None else {}})
    if spec.model.source.startswith("pvc://"):
        claim = spec.model.source.removeprefix("pvc://").partition("/")[0]
        volumes.append({"name": "model", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}})
        mounts.append({"name": "model", "mountPath": f"{c.MODELS_PVC_MOUNT_ROOT}/{claim}", "readOnly": True})
    if spec.model.source.startswith("oci://"):
        # An image volume (GA in Kubernetes 1.35): the kubelet pulls the image once per node and mounts its
        # files read-only; nothing is downloaded by the pod.
        image = {"reference": spec.model.source.removeprefix("oci://"), "pullPolicy": spec.image.pull_policy}
        volumes.append({"name": "model", "image": image})
        mounts.append({"name": "model", "mountPath": c.MODELS_OCI_MOUNT_PATH, "readOnly": True})
    if spec.auth is not None:
        ref = spec.auth.api_key_secret_ref
        volumes.append(
            {"name": "api-key", "secret": {"secretName": ref.name, "items": [{"key": ref.key, "path": "api-key"}]}}
        )
        mounts.append({"name": "api-key", "mountPath": c.API_KEY_MOUNT_PATH, "readOnly": True})
    if spec.tensor_parallel_size() * spec.pipeline_parallel_size() > 1:
        # Parallel ranks (NCCL) exchange tensors through shared memory; the default 64 MiB /dev/shm is too small.
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory"}})
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    return volumes, mounts


def _resources(spec: LLMDeploymentSpec) -> JSON:
    res = spec.resources
    requests: dict[str, str] = {}
    limits: dict[str, str] = {}
    if res.cpu is not None:
        requests["cpu"] = str(res.cpu)
    if res.memory is not None:
        requests["memory"] = limits["memory"] = str(res.memory)
    if res.gpus > 0:
        requests[res.gpu_resource_name] = limits[res.gpu_resource_name] = str(res.gpus)
    out: JSON = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def _probe(path: str, period: int, timeout: int, failures: int) -> JSON:
    return {
        "httpGet": {"path": path, "port": c.PORT_NAME},
        "periodSeconds": period,
        "timeoutSeconds": timeout,
        "failureThreshold": failures,
    }


def pod_security_context(spec: LLMDeploymentSpec, settings: Settings) -> JSON:
    """The restricted Pod Security Standard's pod-level part, with no fixed UID (the image's numeric USER runs,
    and OpenShift's arbitrary UIDs work): then the operator's setting (KUBELLM_RUNTIME_POD_SECURITY_CONTEXT, the
    chart's `operator.runtimePodSecurityContext`, e.g. an fsGroup for a PVC cache), then the spec's, key by key."""
    return {
        "runAsNonRoot": True,
        "seccompProfile": {"type": "RuntimeDefault"},
        **settings.runtime_pod_security_context,
        **spec.pod.security_context,
    }


def render_pod_template(owner: Owner, spec: LLMDeploymentSpec, settings: Settings, config_map: JSON) -> JSON:
    """The runtime pod: what a Deployment replica (and, adapted, each pod of a multi-node group) runs."""
    res = spec.resources
    volumes, mounts = _volumes(owner, spec)
    startup_period = 10
    container: JSON = {
        "name": c.CONTAINER_NAME,
        "image": spec.image.name or settings.runtime_image,
        "imagePullPolicy": spec.image.pull_policy,
        "command": ["kubellm"],
        "args": runtime_args(spec),
        "ports": [{"name": c.PORT_NAME, "containerPort": c.CONTAINER_PORT, "protocol": "TCP"}],
        "env": _env(spec),
        "resources": _resources(spec),
        "volumeMounts": mounts,
        # Model loading can take many minutes: the startup probe holds liveness off until /health answers.
        "startupProbe": _probe(
            c.HEALTH_PATH, startup_period, 5, max(1, math.ceil(settings.startup_timeout_seconds / startup_period))
        ),
        "readinessProbe": _probe(c.READY_PATH, 5, 3, 2),
        "livenessProbe": _probe(c.HEALTH_PATH, 10, 5, 6),
        # The pause lets the endpoints controller drop the pod before SIGTERM makes the runtime drain.
        "lifecycle": {"preStop": {"sleep": {"seconds": settings.prestop_sleep_seconds}}},
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    if settings.prestop_sleep_seconds == 0:
        del container["lifecycle"]
    tolerations = list(res.tolerations)
    if res.gpus > 0:
        tolerations.append({"key": res.gpu_resource_name, "operator": "Exists", "effect": "NoSchedule"})
    pod_spec: JSON = {
        "containers": [container],
        "volumes": volumes,
        "terminationGracePeriodSeconds": settings.drain_seconds,
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": pod_security_context(spec, settings),
    }
    if res.node_selector:
        pod_spec["nodeSelector"] = dict(res.node_selector)
    if tolerations:
        pod_spec["tolerations"] = tolerations
    if res.affinity is not None:
        pod_spec["affinity"] = res.affinity
    if res.priority_class_name is not None:
        pod_spec["priorityClassName"] = res.priority_class_name
    if spec.image.pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": s} for s in spec.image.pull_secrets]
    pod_annotations = {
        **spec.pod.annotations,
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(c.CONTAINER_PORT),
        "prometheus.io/path": c.METRICS_PATH,
        c.ANNOTATION_CONFIG_HASH: config_hash(config_map),
    }
    return {
        "metadata": {"labels": {**spec.pod.labels, **common_labels(owner.name)}, "annotations": pod_annotations},
        "spec": pod_spec,
    }


def render_deployment(owner: Owner, spec: LLMDeploymentSpec, settings: Settings, config_map: JSON) -> JSON:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": object_metadata(owner, owner.name),
        "spec": {
            "replicas": spec.replicas,
            "revisionHistoryLimit": 3,
            # A rollout is "stuck" only after the slowest acceptable model load.
            "progressDeadlineSeconds": settings.startup_timeout_seconds + 120,
            "selector": {"matchLabels": selector_labels(owner.name)},
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxSurge": spec.rollout.max_surge, "maxUnavailable": spec.rollout.max_unavailable},
            },
            "template": render_pod_template(owner, spec, settings, config_map),
        },
    }


def serving_selector(name: str, spec: LLMDeploymentSpec) -> dict[str, str]:
    """The pods that serve the API: all of them, or in multi-node groups only each group's pod 0 (the others run
    only their ranks' workers)."""
    if spec.nodes() > 1:
        return {**selector_labels(name), c.LABEL_POD_INDEX: "0"}
    return selector_labels(name)


def render_service(owner: Owner, spec: LLMDeploymentSpec) -> JSON:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": object_metadata(owner, owner.name, spec.service.annotations),
        "spec": {
            "type": spec.service.type,
            "selector": serving_selector(owner.name, spec),
            "ports": [{"name": c.PORT_NAME, "port": spec.service.port, "targetPort": c.PORT_NAME, "protocol": "TCP"}],
        },
    }


def render_pdb(owner: Owner, spec: LLMDeploymentSpec) -> JSON | None:
    if spec.replicas <= 1:
        return None
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": object_metadata(owner, owner.name),
        "spec": {
            "maxUnavailable": 1,
            "selector": {"matchLabels": selector_labels(owner.name)},
            # A replica that never became ready protects nothing: let drains evict it.
            "unhealthyPodEvictionPolicy": "AlwaysAllow",
        },
    }

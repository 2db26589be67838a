"""Names shared by the operator, its CRD and the objects it creates."""

from __future__ import annotations

from typing import Final

from kubellm import contract

GROUP: Final = contract.LLMD_GROUP
VERSION: Final = contract.LLMD_VERSION
API_VERSION: Final = f"{GROUP}/{VERSION}"
KIND: Final = "LLMDeployment"
PLURAL: Final = contract.LLMD_PLURAL
SINGULAR: Final = "llmdeployment"
SHORT_NAME: Final = "llmd"
CRD_NAME: Final = f"{PLURAL}.{GROUP}"
# LLMRoute: its CRD is generated here too (crd.py); the gateway is what reads it.
ROUTE_KIND: Final = "LLMRoute"
ROUTE_PLURAL: Final = contract.LLMROUTE_PLURAL
ROUTE_SINGULAR: Final = "llmroute"
ROUTE_SHORT_NAME: Final = "llmr"
ROUTE_CRD_NAME: Final = f"{ROUTE_PLURAL}.{GROUP}"

# One field manager for every server-side apply: the operator owns exactly the fields it renders.
FIELD_MANAGER: Final = "kubellm-operator"

# Recommended labels (https://kubernetes.io/docs/concepts/overview/working-with-objects/common-labels/).
LABEL_NAME: Final = "app.kubernetes.io/name"
LABEL_INSTANCE: Final = contract.LABEL_INSTANCE
LABEL_COMPONENT: Final = contract.LABEL_COMPONENT
LABEL_MANAGED_BY: Final = contract.LABEL_MANAGED_BY
LABEL_PART_OF: Final = "app.kubernetes.io/part-of"
APP_NAME: Final = "kubellm"
COMPONENT_RUNTIME: Final = contract.COMPONENT_RUNTIME
COMPONENT_MODEL_LOADER: Final = "model-loader"  # the loader Job of storage.modelCache (model_cache.py)
MANAGED_BY: Final = contract.MANAGED_BY_OPERATOR
RESERVED_LABELS: Final = (LABEL_NAME, LABEL_INSTANCE, LABEL_COMPONENT, LABEL_MANAGED_BY, LABEL_PART_OF)

# Multi-node replicas (groups.py): the group a pod belongs to, and its ordinal, which the StatefulSet controller
# labels it with (GA in Kubernetes 1.32): the runtime's --node-rank, and 0 marks the pod that serves the API.
LABEL_GROUP: Final = contract.LABEL_GROUP
LABEL_POD_INDEX: Final = contract.LABEL_POD_INDEX
# group_restart.py: on a group's worker pods, the uid of the rank-0 pod they joined; on a rank-0 pod, that all its
# workers had joined (a worker lost after that restarts the whole group).
ANNOTATION_GROUP_LEADER: Final = f"{GROUP}/group-leader"
ANNOTATION_GROUP_COMPLETE: Final = f"{GROUP}/group-complete"
# The torch.distributed rendezvous port on a group's pod 0 (the runtime's --master-port default).
DIST_PORT: Final = 29500

# Pod template annotation holding a hash of the engine ConfigMap: a config change rolls the pods.
ANNOTATION_CONFIG_HASH: Final = f"{GROUP}/config-hash"
# Set on an LLMDeployment at 0 replicas (any value): the operator scales it to 1 and removes the annotation.
ANNOTATION_WAKE: Final = contract.ANNOTATION_WAKE
ANNOTATION_WAKE_HELD: Final = contract.ANNOTATION_WAKE_HELD
# kopf keeps its progress and last-handled state in annotations under this prefix (the status is ours).
KOPF_ANNOTATION_PREFIX: Final = f"operator.{GROUP}"

# The runtime container: `kubellm serve` listens here and exposes the probes and /metrics.
CONTAINER_NAME: Final = "runtime"
CONTAINER_PORT: Final = contract.CONTAINER_PORT
PORT_NAME: Final = "http"
HEALTH_PATH: Final = contract.HEALTH_PATH
READY_PATH: Final = contract.READY_PATH
METRICS_PATH: Final = contract.METRICS_PATH
CONFIG_MOUNT_PATH: Final = "/etc/kubellm"
ENGINE_CONFIG_KEY: Final = "engine.json"
CHAT_TEMPLATE_KEY: Final = "chat_template.jinja"
MODEL_CACHE_PATH: Final = "/var/cache/kubellm"
MODELS_PVC_MOUNT_ROOT: Final = "/models"
MODELS_OCI_MOUNT_PATH: Final = "/model-image"  # an oci:// source's image volume
API_KEY_MOUNT_PATH: Final = "/var/run/secrets/kubellm"
DEFAULT_GPU_RESOURCE: Final = "nvidia.com/gpu"

# kopf's peering objects, which the fleet loop reads to know whether this replica leads.
PEERING_API_VERSION: Final = "kopf.dev/v1"
PEERING_KIND: Final = "KopfPeering"
CLUSTER_PEERING_KIND: Final = "ClusterKopfPeering"

# The pods the operator reads (a loader's log) and restarts (a multi-node group's).
POD_API_VERSION: Final = "v1"
POD_KIND: Final = "Pod"
LABEL_JOB_NAME: Final = "batch.kubernetes.io/job-name"  # the Job controller's label on a Job's pods

# Events the operator posts (core/v1, what `kubectl describe` shows).
EVENT_API_VERSION: Final = "v1"
EVENT_KIND: Final = "Event"

# Condition types reported in status.conditions.
CONDITION_READY: Final = "Ready"
CONDITION_PROGRESSING: Final = "Progressing"
CONDITION_DEGRADED: Final = "Degraded"
CONDITION_SCALING_ACTIVE: Final = "ScalingActive"
CONDITION_SCALING_LIMITED: Final = "ScalingLimited"
CONDITION_TYPES: Final = (
    CONDITION_READY,
    CONDITION_PROGRESSING,
    CONDITION_DEGRADED,
    CONDITION_SCALING_ACTIVE,
    CONDITION_SCALING_LIMITED,
)
MAX_SCALING_DECISIONS: Final = 10

# The runtime's Prometheus metrics, named as vLLM names them.
METRIC_WAITING: Final = contract.METRIC_WAITING
METRIC_RUNNING: Final = contract.METRIC_RUNNING
METRIC_KV_USAGE: Final = contract.METRIC_KV_USAGE

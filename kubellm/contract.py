"""The contract between the operator and the runtime (torch-free: the operator image has no torch).

Both sides import these facts instead of writing them down twice: where the runtime listens, its probe paths,
the metric names the autoscaler reads, and the engine's settings (runtime/config.py's EngineConfig, the one
definition: the serve flags are generated from it, the operator renders a config file with its field names and
validates the engine section with it).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Final

from kubellm.runtime.config import EngineConfig, engine_config

# The LLMDeployment API: the operator serves it; the gateway watches it and sets the wake annotation.
LLMD_GROUP: Final = "kubellm.io"
LLMD_VERSION: Final = "v1alpha1"
LLMD_PLURAL: Final = "llmdeployments"
# The LLMRoute API (same group and version): virtual models over tiers of LLMDeployments; only the gateway reads it.
LLMROUTE_PLURAL: Final = "llmroutes"
# Set on an LLMDeployment at 0 replicas (any value): the operator scales it to 1 and removes the annotation.
ANNOTATION_WAKE: Final = f"{LLMD_GROUP}/wake"
# Beside it (optional): how many requests the gateway held when it woke the model. With autoscaling on, the operator
# wakes it straight to as many replicas as that queue asks for (a burst at zero need not wait for a second decision).
ANNOTATION_WAKE_HELD: Final = f"{LLMD_GROUP}/wake-held-requests"
# Labels on every runtime pod the operator creates (the gateway finds an LLMDeployment's pods by them).
LABEL_INSTANCE: Final = "app.kubernetes.io/instance"  # the LLMDeployment's name
LABEL_COMPONENT: Final = "app.kubernetes.io/component"
LABEL_MANAGED_BY: Final = "app.kubernetes.io/managed-by"
COMPONENT_RUNTIME: Final = "runtime"
MANAGED_BY_OPERATOR: Final = "kubellm-operator"
# A multi-node replica group's pods (parallelism.nodes > 1) carry their group's index, and the StatefulSet
# controller's ordinal label: only pod 0 serves the API (the gateway routes to it alone; the others run only
# their ranks' workers).
LABEL_GROUP: Final = f"{LLMD_GROUP}/group"
LABEL_POD_INDEX: Final = "apps.kubernetes.io/pod-index"

CONTAINER_PORT: Final = 8000
HEALTH_PATH: Final = "/health"
READY_PATH: Final = "/ready"
METRICS_PATH: Final = "/metrics"

# Prometheus metrics, named as vLLM names them (what routers and autoscalers built for vLLM read).
METRIC_WAITING: Final = "vllm:num_requests_waiting"
METRIC_RUNNING: Final = "vllm:num_requests_running"
METRIC_KV_USAGE: Final = "vllm:kv_cache_usage_perc"

# The gateway (`kubellm gateway`): its port, and the gauge of requests it holds for a model with no ready replica,
# labelled namespace / llmdeployment / model_name. Waiting load the runtimes cannot see: an autoscaler adds it to
# the runtimes' METRIC_WAITING (scraped from the gateway pods' /metrics, or through Prometheus and KEDA).
GATEWAY_PORT: Final = 8080
METRIC_GATEWAY_HELD: Final = "kubellm_gateway_held_requests"

# Errors in OpenAI's shape, {"error": {"message", "type", "param", "code"}}: the type each HTTP status answers with,
# alike from the runtime and from the gateway in front of it.
ERROR_TYPE_BY_STATUS: Final = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_error",
    502: "upstream_error",
    503: "service_unavailable",
}


def error_type(status: int) -> str:
    return ERROR_TYPE_BY_STATUS.get(status, "invalid_request_error")


# The config file `kubellm serve --config` reads: {"engine": {EngineConfig fields}, "server": {serve flags}}.
CONFIG_ENGINE_SECTION: Final = "engine"
CONFIG_SERVER_SECTION: Final = "server"


def engine_fields() -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(EngineConfig))


def check_engine_section(section: dict[str, Any]) -> str | None:
    """The engine section validated by EngineConfig itself; None if it is valid, else the first error. Paths
    inside the pod (a chat template file) cannot be checked from outside it and are left to the runtime."""
    try:
        engine_config({**section, "chat_template": None})
    except (TypeError, ValueError) as exc:
        return str(exc)
    return None

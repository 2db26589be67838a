"""PURE: a replica that spans several nodes (`parallelism.nodes: K > 1`) as a group of K pods.

Replica group i is a StatefulSet `{name}-g{i}` of K pods with a headless Service of the same name, the layout
LeaderWorkerSet gives upstream (LWS is the drop-in where it is installed; this form needs nothing but the core
API). The StatefulSet controller labels each pod with its ordinal (`apps.kubernetes.io/pod-index`), which becomes
the runtime's `--node-rank`; pod 0 (`{name}-g{i}-0.{name}-g{i}.{namespace}.svc`, a stable DNS name through the
headless Service, published before it is Ready) is the `torch.distributed` rendezvous and the only pod that serves
the API: only ordinal-0 pods are selected by the LLMDeployment's Service. Replicas count groups.

Pods start in parallel (`podManagementPolicy: Parallel`): rank 0 cannot become Ready before every rank joined.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kubellm.operator import constants as c
from kubellm.operator.resources import (
    JSON,
    Owner,
    object_metadata,
    render_pod_template,
    selector_labels,
)
from kubellm.operator.settings import Settings
from kubellm.operator.spec import LLMDeploymentSpec
from kubellm.operator.status import DeploymentState

NODE_RANK_ENV = "KUBELLM_NODE_RANK"
DIST_PORT_NAME = "dist"


def group_name(name: str, index: int) -> str:
    return f"{name}-g{index}"


def rendezvous_host(owner: Owner, index: int) -> str:
    """Pod 0 of group `index`, through the group's headless Service."""
    group = group_name(owner.name, index)
    return f"{group}-0.{group}.{owner.namespace}.svc"


def group_labels(name: str, index: int) -> dict[str, str]:
    return {**selector_labels(name), c.LABEL_GROUP: str(index)}


def render_group_service(owner: Owner, index: int) -> JSON:
    """Headless: DNS names for the group's pods, published before they are Ready (the rendezvous comes first)."""
    meta = object_metadata(owner, group_name(owner.name, index), labels={c.LABEL_GROUP: str(index)})
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta,
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": group_labels(owner.name, index),
            "ports": [{"name": DIST_PORT_NAME, "port": c.DIST_PORT, "targetPort": c.DIST_PORT, "protocol": "TCP"}],
        },
    }


def _group_pod_template(
    owner: Owner, spec: LLMDeploymentSpec, settings: Settings, config_map: JSON, index: int
) -> JSON:
    template = copy.deepcopy(render_pod_template(owner, spec, settings, config_map))
    template["metadata"]["labels"][c.LABEL_GROUP] = str(index)
    container = template["spec"]["containers"][0]
    nodes = spec.nodes()
    group_args = [
        f"--nnodes={nodes}",
        # $(VAR) in args is expanded by the kubelet from the container's env: the ordinal, from the pod's label
        f"--node-rank=$({NODE_RANK_ENV})",
        f"--master-addr={rendezvous_host(owner, index)}",
        f"--master-port={c.DIST_PORT}",
    ]
    # after `serve --config FILE`, before the user's extraArgs (which override both)
    container["args"] = [*container["args"][:3], *group_args, *container["args"][3:]]
    rank_env = {
        "name": NODE_RANK_ENV,
        "valueFrom": {"fieldRef": {"fieldPath": f"metadata.labels['{c.LABEL_POD_INDEX}']"}},
    }
    container["env"] = [rank_env, *container["env"]]
    container["ports"] = [
        *container["ports"],
        {"name": DIST_PORT_NAME, "containerPort": c.DIST_PORT, "protocol": "TCP"},
    ]
    return template


def render_group_statefulset(
    owner: Owner, spec: LLMDeploymentSpec, settings: Settings, config_map: JSON, index: int
) -> JSON:
    nodes = spec.nodes()
    meta = object_metadata(owner, group_name(owner.name, index), labels={c.LABEL_GROUP: str(index)})
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": meta,
        "spec": {
            "replicas": nodes,
            "serviceName": group_name(owner.name, index),
            "podManagementPolicy": "Parallel",
            "revisionHistoryLimit": 3,
            "selector": {"matchLabels": group_labels(owner.name, index)},
            "updateStrategy": {"type": "RollingUpdate"},
            "template": _group_pod_template(owner, spec, settings, config_map, index),
        },
    }


def render_groups(owner: Owner, spec: LLMDeploymentSpec, settings: Settings, config_map: JSON) -> list[JSON]:
    """Per replica group: its headless Service, then its StatefulSet (whose pods resolve each other through it)."""
    objects: list[JSON] = []
    for index in range(spec.replicas):
        objects.append(render_group_service(owner, index))
        objects.append(render_group_statefulset(owner, spec, settings, config_map, index))
    return objects


@dataclass(frozen=True)
class StatefulSetState:
    """One group's StatefulSet as observed (kept in a kopf index): its status reads as a Deployment's does."""

    name: str
    state: DeploymentState

    @classmethod
    def from_object(cls, obj: JSON) -> StatefulSetState:
        return cls(name=str((obj.get("metadata") or {}).get("name", "")), state=DeploymentState.from_object(obj))


def groups_state(statefulsets: Sequence[StatefulSetState], nodes: int) -> DeploymentState:
    """The groups' StatefulSets as one Deployment-like state counted in groups: a group is ready, updated or
    available only when all its `nodes` pods are."""
    whole = max(1, nodes)
    states = [s.state for s in statefulsets]
    return DeploymentState(
        generation=1,
        observed_generation=int(all(s.observed_generation >= s.generation for s in states)),
        replicas=len(states),
        ready_replicas=sum(s.ready_replicas >= whole for s in states),
        updated_replicas=sum(s.updated_replicas >= whole for s in states),
        available_replicas=sum(s.available_replicas >= whole for s in states),
    )


def workload_state(
    spec: LLMDeploymentSpec, key: object, deployments: Mapping[Any, Any], statefulsets: Mapping[Any, Any]
) -> DeploymentState | None:
    """The owner's workload as the status reads it, from the kopf indices (key: (namespace, LLMDeployment name)):
    its Deployment, or its groups' StatefulSets counted in groups. None: none exists yet."""
    if spec.nodes() > 1:
        sets = list(statefulsets.get(key, ()))
        return groups_state(sets, spec.nodes()) if sets else None
    return next(iter(deployments.get(key, ())), None)

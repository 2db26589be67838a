"""The simulated nodes: Node manifests for kwok to manage, and the kwok configuration (its stages).

Addresses stay on loopback so that end-to-end tests can run real processes on a pod's own IP. With the default
pod CIDR 127.16.0.0/16 the /24 subnets are handed out as:

    127.16.0.0/24      node InternalIPs (127.16.0.1, 127.16.0.2, ...)
    127.16.<i+1>.0/24  node i's spec.podCIDR: its pods' IPs (kwok allocates them from there)
    last /24           kwok's --cidr, for nodes created later without a podCIDR
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any

from kubellm.runtime.download import PERMANENT_EXIT_CODE

# kwok manages only nodes carrying this annotation, so a test may also create nodes it drives by hand.
KWOK_ANNOTATION = "kwok.x-k8s.io/node"
KWOK_ANNOTATION_VALUE = "fake"
POOL_LABEL = "kubellm.io/node-pool"
GPU_RESOURCE = "nvidia.com/gpu"


@dataclass(frozen=True)
class NodePool:
    name: str
    count: int
    cpu: str = "32"
    memory: str = "256Gi"
    pods: str = "110"
    gpus: int = 0
    labels: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("-", "").isalnum() or self.name != self.name.lower():
            raise ValueError(f"NodePool.name must be a lowercase DNS label, got {self.name!r}")
        if self.count < 0:
            raise ValueError(f"NodePool.count must be >= 0, got {self.count}")
        if self.gpus < 0:
            raise ValueError(f"NodePool.gpus must be >= 0, got {self.gpus}")


DEFAULT_NODE_POOLS: tuple[NodePool, ...] = (
    NodePool("cpu", count=2),
    NodePool(
        "gpu",
        count=2,
        gpus=8,
        labels={"nvidia.com/gpu.present": "true", "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
    ),
)


@dataclass(frozen=True)
class NodeLayout:
    """Where each node and its pods live inside the pod CIDR."""

    name: str
    pool: NodePool
    internal_ip: str
    pod_cidr: str


def parse_pod_cidr(pod_cidr: str) -> ipaddress.IPv4Network:
    try:
        network = ipaddress.ip_network(pod_cidr, strict=True)
    except ValueError as exc:
        raise ValueError(f"pod_cidr: {exc}") from exc
    if not isinstance(network, ipaddress.IPv4Network) or not network.subnet_of(ipaddress.IPv4Network("127.0.0.0/8")):
        raise ValueError(f"pod_cidr must be an IPv4 range inside 127.0.0.0/8 (loopback), got {pod_cidr}")
    if network.prefixlen > 22:
        raise ValueError(f"pod_cidr needs room for several /24 subnets (prefix length <= 22), got {pod_cidr}")
    return network


def layout(pod_cidr: str, pools: tuple[NodePool, ...]) -> tuple[list[NodeLayout], str]:
    """Nodes with their addresses, and the default CIDR for kwok's --cidr."""
    network = parse_pod_cidr(pod_cidr)
    subnets = list(network.subnets(new_prefix=24))
    names = [f"kwok-{pool.name}-{i}" for pool in pools for i in range(pool.count)]
    if len(names) + 2 > len(subnets):
        raise ValueError(f"pod_cidr {pod_cidr} has {len(subnets)} /24 subnets, too few for {len(names)} nodes")
    node_ip_subnet = subnets[0]
    nodes = []
    index = 0
    for pool in pools:
        for i in range(pool.count):
            nodes.append(
                NodeLayout(
                    name=f"kwok-{pool.name}-{i}",
                    pool=pool,
                    internal_ip=str(node_ip_subnet[index + 1]),
                    pod_cidr=str(subnets[index + 1]),
                )
            )
            index += 1
    return nodes, str(subnets[-1])


def node_manifest(node: NodeLayout) -> dict[str, Any]:
    resources = {"cpu": node.pool.cpu, "memory": node.pool.memory, "pods": node.pool.pods}
    if node.pool.gpus:
        resources[GPU_RESOURCE] = str(node.pool.gpus)
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": node.name,
            "annotations": {KWOK_ANNOTATION: KWOK_ANNOTATION_VALUE},
            "labels": {
                "kubernetes.io/hostname": node.name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "type": "kwok",
                POOL_LABEL: node.pool.name,
                **node.pool.labels,
            },
        },
        "spec": {"podCIDR": node.pod_cidr, "podCIDRs": [node.pod_cidr]},
        # kwok's node-initialize stage keeps the capacity and addresses given here and adds the conditions.
        "status": {
            "capacity": resources,
            "allocatable": resources,
            "addresses": [
                {"type": "InternalIP", "address": node.internal_ip},
                {"type": "Hostname", "address": node.name},
            ],
        },
    }


# kwok stages, each a state transition applied to objects matching its selector. Pods move without delay
# (Pending with an IP -> Running and Ready) unless the annotation pod-ready.stage.kwok.x-k8s.io/delay (e.g. "30s")
# holds one back, which lets a test keep pods unready for a while.
_NODE_INITIALIZE = """\
apiVersion: kwok.x-k8s.io/v1alpha1
kind: Stage
metadata:
  name: node-initialize
spec:
  resourceRef: {apiGroup: v1, kind: Node}
  selector:
    matchExpressions:
    - key: '.status.conditions.[] | select( .type == "Ready" ) | .status'
      operator: NotIn
      values: ['True']
  next:
    statusTemplate: |
      {{ $now := Now }}
      conditions:
      {{ range NodeConditions }}
      - lastHeartbeatTime: {{ $now | Quote }}
        lastTransitionTime: {{ $now | Quote }}
        message: {{ .message | Quote }}
        reason: {{ .reason | Quote }}
        status: {{ .status | Quote }}
        type: {{ .type | Quote }}
      {{ end }}
      addresses:
      {{ YAML .status.addresses 1 }}
      allocatable:
      {{ YAML .status.allocatable 1 }}
      capacity:
      {{ YAML .status.capacity 1 }}
      nodeInfo:
        architecture: amd64
        operatingSystem: linux
        kubeletVersion: {{ printf "kwok-%s" Version | Quote }}
        kubeProxyVersion: {{ printf "kwok-%s" Version | Quote }}
        containerRuntimeVersion: {{ printf "kwok-%s" Version | Quote }}
        kernelVersion: {{ printf "kwok-%s" Version | Quote }}
        bootID: ""
        machineID: ""
        osImage: ""
        systemUUID: ""
      phase: Running
"""

_POD_CREATE = """\
apiVersion: kwok.x-k8s.io/v1alpha1
kind: Stage
metadata:
  name: pod-create
spec:
  resourceRef: {apiGroup: v1, kind: Pod}
  selector:
    matchExpressions:
    - {key: .metadata.deletionTimestamp, operator: DoesNotExist}
    - {key: .status.podIP, operator: DoesNotExist}
  next:
    event: {type: Normal, reason: Created, message: Created container}
    statusTemplate: |
      {{ $now := Now }}
      conditions:
      - {type: Initialized, status: "True", lastTransitionTime: {{ $now | Quote }}}
      - {type: Ready, status: "False", reason: ContainersNotReady, lastTransitionTime: {{ $now | Quote }}}
      - {type: ContainersReady, status: "False", reason: ContainersNotReady, lastTransitionTime: {{ $now | Quote }}}
      containerStatuses:
      {{ range .spec.containers }}
      - image: {{ .image | Quote }}
        name: {{ .name | Quote }}
        ready: false
        restartCount: 0
        started: false
        state: {waiting: {reason: ContainerCreating}}
      {{ end }}
      hostIP: {{ NodeIPWith .spec.nodeName | Quote }}
      podIP: {{ PodIPWith .spec.nodeName ( or .spec.hostNetwork false ) "" "" "" | Quote }}
      phase: Pending
"""

_POD_READY = """\
apiVersion: kwok.x-k8s.io/v1alpha1
kind: Stage
metadata:
  name: pod-ready
spec:
  resourceRef: {apiGroup: v1, kind: Pod}
  selector:
    matchExpressions:
    - {key: .metadata.deletionTimestamp, operator: DoesNotExist}
    - {key: .status.phase, operator: In, values: [Pending]}
    - {key: .status.podIP, operator: Exists}
  delay:
    durationMilliseconds: 0
    durationFrom:
      expressionFrom: '.metadata.annotations["pod-ready.stage.kwok.x-k8s.io/delay"]'
  next:
    event: {type: Normal, reason: Started, message: Started container}
    statusTemplate: |
      {{ $now := Now }}
      conditions:
      - {type: Initialized, status: "True", lastTransitionTime: {{ $now | Quote }}}
      - {type: Ready, status: "True", lastTransitionTime: {{ $now | Quote }}}
      - {type: ContainersReady, status: "True", lastTransitionTime: {{ $now | Quote }}}
      containerStatuses:
      {{ range .spec.containers }}
      - image: {{ .image | Quote }}
        name: {{ .name | Quote }}
        ready: true
        restartCount: 0
        started: true
        state: {running: {startedAt: {{ $now | Quote }}}}
      {{ end }}
      phase: Running
      startTime: {{ $now | Quote }}
"""

# Without a kubelet nothing would ever finish a graceful deletion: kwok removes pods once they are marked deleted
# and carry no finalizers.
_POD_DELETE = """\
apiVersion: kwok.x-k8s.io/v1alpha1
kind: Stage
metadata:
  name: pod-delete
spec:
  resourceRef: {apiGroup: v1, kind: Pod}
  selector:
    matchExpressions:
    - {key: .metadata.deletionTimestamp, operator: Exists}
    - {key: .metadata.finalizers, operator: DoesNotExist}
  next:
    delete: true
"""


# The operator's model loader pods (a Job's) finish as soon as they run: a download of the source hf://kwok/fails
# fails the way `kubellm download` fails for a repository that does not exist (its permanent exit code, the cause
# in the termination message); any other succeeds. (What a download does is tested on its own, tests/runtime.)
_LOADER_FAILS = "hf://kwok/fails"
_LOADER_FINISH = """\
apiVersion: kwok.x-k8s.io/v1alpha1
kind: Stage
metadata:
  name: loader-{outcome}
spec:
  resourceRef: {{apiGroup: v1, kind: Pod}}
  selector:
    matchExpressions:
    - {{key: .metadata.deletionTimestamp, operator: DoesNotExist}}
    - {{key: .status.phase, operator: In, values: [Running]}}
    - {{key: '.metadata.labels["app.kubernetes.io/component"]', operator: In, values: [model-loader]}}
    - {{key: '.spec.containers.[0].args.[1]', operator: {operator}, values: [{fails}]}}
  next:
    statusTemplate: |
      {{{{ $now := Now }}}}
      conditions:
      - {{type: Ready, status: "False", reason: PodCompleted, lastTransitionTime: {{{{ $now | Quote }}}}}}
      - {{type: ContainersReady, status: "False", reason: PodCompleted, lastTransitionTime: {{{{ $now | Quote }}}}}}
      containerStatuses:
      {{{{ range .spec.containers }}}}
      - image: {{{{ .image | Quote }}}}
        name: {{{{ .name | Quote }}}}
        ready: false
        restartCount: 0
        started: false
        state:
          terminated: {{exitCode: {code}, reason: {reason}, message: {message}, finishedAt: {{{{ $now | Quote }}}}}}
      {{{{ end }}}}
      phase: {phase}
"""
_LOADER_SUCCEED = _LOADER_FINISH.format(
    outcome="succeed", operator="NotIn", fails=_LOADER_FAILS, code=0, reason="Completed", message='""',
    phase="Succeeded",
)  # fmt: skip
_LOADER_FAIL = _LOADER_FINISH.format(
    outcome="fail", operator="In", fails=_LOADER_FAILS, code=PERMANENT_EXIT_CODE, reason="Error",
    message=f'"RepositoryNotFoundError: {_LOADER_FAILS} does not exist"', phase="Failed",
)  # fmt: skip


def kwok_config() -> str:
    """The multi-document YAML passed to kwok with --config."""
    return "---\n".join((_NODE_INITIALIZE, _POD_CREATE, _POD_READY, _POD_DELETE, _LOADER_SUCCEED, _LOADER_FAIL))

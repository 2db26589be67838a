"""The real Kubernetes control plane the tests run against (etcd, kube-apiserver, kube-controller-manager,
kube-scheduler, kwok nodes), on loopback. See controlplane.py; the pytest fixture is in fixture.py;
`PYTHONPATH=tests python -m cluster up|down|env|provision` drives it by hand."""

from .controlplane import ClusterConfig, ControlPlane, ControlPlaneError, listening_ports, wait_until
from .nodes import GPU_RESOURCE, NodePool
from .provision import Binaries, BinariesUnavailable, ensure_binaries, find_binaries

__all__ = [
    "GPU_RESOURCE",
    "Binaries",
    "BinariesUnavailable",
    "ClusterConfig",
    "ControlPlane",
    "ControlPlaneError",
    "NodePool",
    "ensure_binaries",
    "find_binaries",
    "listening_ports",
    "wait_until",
]

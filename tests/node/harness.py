"""Starting a control plane in in-cluster mode with one real node, for the node tests' fixtures and for tests that
need the host's state around the node's whole life (test_teardown)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from cluster.controlplane import ClusterConfig, ControlPlane
from cluster.fixture import _binaries_key, _provision, _random_loopback_pod_cidr
from cluster.nodeconfig import NodeNetwork
from cluster.nodeparts import NodeParts
from cluster.provision import BinariesUnavailable
from cluster.realnode import RealNode


@dataclass
class NodeCluster:
    control_plane: ControlPlane
    node: RealNode

    def stop(self) -> None:
        try:
            self.node.stop()
        finally:
            self.control_plane.stop()


def log(request: pytest.FixtureRequest) -> Callable[[str], None]:
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None:
        return print
    return lambda message: reporter.write_line(f"[node] {message}")


def start_node_cluster(
    request: pytest.FixtureRequest, parts: NodeParts, state_dir: Path, *, crds: bool = True
) -> NodeCluster:
    """A fresh control plane in in-cluster mode and one real node (the caller stops both). crds: apply the
    repository's CRDs at start (False for tests that `helm install` them)."""
    binaries = request.config.stash.get(_binaries_key, None) or _provision(request.config)
    if isinstance(binaries, BinariesUnavailable):
        pytest.skip(f"no Kubernetes binaries: {binaries}")
    network = NodeNetwork.pick()
    # No kwok nodes: every pod lands on the real node.
    config = ClusterConfig(
        pod_cidr=_random_loopback_pod_cidr(),
        node_pools=(),
        advertise_address=network.host_ip,
        crds_dir=ClusterConfig.crds_dir if crds else None,
    )
    control_plane = ControlPlane(binaries, config, state_dir / "control-plane").start()
    try:
        node = RealNode(control_plane, parts, network, state_dir / "node").start()
    except BaseException:
        control_plane.stop()
        raise
    started = control_plane.startup_seconds["ready"]
    log(request)(f"control plane up in {started} s, then real node {node.name}: {node.startup_seconds}")
    return NodeCluster(control_plane, node)

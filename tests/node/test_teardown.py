"""The real node leaves the host as it found it: links, addresses, routes, nft/iptables rules, sysctls, mounts,
cgroups, processes and the default state folders are the same after it goes down as before it came up, with a
running pod behind a Service (shims, a container, kube-proxy's rules) at the moment it is stopped."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cluster.nodeparts import PAUSE_IMAGE, NodeParts
from cluster.nodeteardown import sweep_stale

from node import hoststate, manifests
from node.harness import start_node_cluster

pytestmark = [pytest.mark.k8s, pytest.mark.node, pytest.mark.slow]


def test_the_host_is_unchanged_after_the_node_goes_down(
    request: pytest.FixtureRequest, node_parts: NodeParts, tmp_path: Path
) -> None:
    before = hoststate.snapshot()
    cluster = start_node_cluster(request, node_parts, tmp_path)
    try:
        cp, node = cluster.control_plane, cluster.node
        with cp.namespace("node-teardown-") as ns:
            objects = [manifests.pod("holder", PAUSE_IMAGE), manifests.service("holder", 80, 8080)]
            cp.kubectl(
                "apply", "-n", ns, "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": objects})
            )
            cp.kubectl("wait", "-n", ns, "--for=condition=Ready", "pod/holder", "--timeout=120s", timeout=130)
            during = hoststate.snapshot()
            # The node did change the host while up (else the comparison below proves nothing): its veth and
            # route, its cgroups, its processes.
            changed = hoststate.diff(before, during)
            assert {"links", "routes", "cgroups", "processes"} <= changed.keys(), changed.keys()
            assert "holder" in node.in_node("iptables-save").stdout  # kube-proxy's rules, in the node's namespace
            assert "holder" not in "\n".join(during["iptables"])  # type: ignore[arg-type]
    finally:
        cluster.stop()
    after = hoststate.snapshot()
    assert hoststate.diff(before, after) == {}


def test_a_node_whose_process_was_killed_is_torn_down_by_the_next_start(
    request: pytest.FixtureRequest, node_parts: NodeParts, tmp_path: Path
) -> None:
    """A SIGKILLed test process leaves shims, containers, the veth (held by the shims' namespace) and the cgroups:
    the next node's start sweeps them."""
    before = hoststate.snapshot()
    cluster = start_node_cluster(request, node_parts, tmp_path / "first")
    cp, node = cluster.control_plane, cluster.node
    try:
        with cp.namespace("node-crash-") as ns:
            cp.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(manifests.pod("holder", PAUSE_IMAGE)))
            cp.kubectl("wait", "-n", ns, "--for=condition=Ready", "pod/holder", "--timeout=120s", timeout=130)
            node.crash()  # what the kernel does to the node's own processes when the test process dies
            left = hoststate.diff(before, hoststate.snapshot())
            assert {"links", "cgroups", "processes"} <= left.keys(), left.keys()
    finally:
        cp.stop()
    assert sweep_stale() == [node.name]
    assert hoststate.diff(before, hoststate.snapshot()) == {}

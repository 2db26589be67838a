"""Fixtures for the real node (tests/cluster/realnode.py): its parts provisioned once per session (skips, or fails
in CI, where the node cannot run), and a control plane in in-cluster mode with one real node, per test module."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from cluster.nodeparts import NodeParts, NodeUnavailable, provision_node

from node.harness import NodeCluster, log, start_node_cluster


@pytest.fixture(scope="session")
def node_parts(request: pytest.FixtureRequest) -> NodeParts:
    start = time.monotonic()
    try:
        parts = provision_node(log=log(request))
    except NodeUnavailable as exc:
        pytest.skip(f"no real node here: {exc}")
    log(request)(f"node parts ready in {time.monotonic() - start:.1f} s")
    return parts


@pytest.fixture(scope="module")
def node_cluster(
    request: pytest.FixtureRequest, node_parts: NodeParts, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[NodeCluster]:
    cluster = start_node_cluster(request, node_parts, tmp_path_factory.mktemp("node-cluster"))
    try:
        yield cluster
    finally:
        cluster.stop()

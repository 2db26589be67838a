"""Fixtures for the real node (tests/cluster/realnode.py): its parts provisioned once per session (skips, or fails
in CI, where the node cannot run), a control plane in in-cluster mode with one real node per test module (with or
without our CRDs), and the images built here for it (tests/cluster/images.py)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cluster import images, projectimages
from cluster.nodeparts import NodeParts, NodeUnavailable, provision_node

from node.harness import NodeCluster, log, start_node_cluster

_parts_key = pytest.StashKey[NodeParts | NodeUnavailable]()


def _provision(config: pytest.Config) -> NodeParts | NodeUnavailable:
    reporter = config.pluginmanager.get_plugin("terminalreporter")

    def say(message: str) -> None:
        if reporter is not None:
            reporter.write_line(f"[node] {message}")

    start = time.monotonic()
    result: NodeParts | NodeUnavailable
    try:
        result = provision_node(log=say)
    except NodeUnavailable as exc:
        result = exc
        say(f"no real node here: {exc}")
    else:
        say(f"node parts ready in {time.monotonic() - start:.1f} s")
    config.stash[_parts_key] = result
    return result


def pytest_collection_finish(session: pytest.Session) -> None:
    """Provisioned after collection, like the control plane's binaries: a cold kubelet build takes minutes and must
    not count against the first node test's timeout."""
    if not session.config.option.collectonly and any(item.get_closest_marker("node") for item in session.items):
        _provision(session.config)


@pytest.fixture(scope="session")
def node_parts(request: pytest.FixtureRequest) -> NodeParts:
    parts = request.config.stash.get(_parts_key, None) or _provision(request.config)
    if isinstance(parts, NodeUnavailable):
        pytest.skip(f"no real node here: {parts}")
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


@pytest.fixture(scope="module")
def bare_node_cluster(
    request: pytest.FixtureRequest, node_parts: NodeParts, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[NodeCluster]:
    """The same without our CRDs, for what installs them itself (helm install)."""
    cluster = start_node_cluster(request, node_parts, tmp_path_factory.mktemp("bare-node-cluster"), crds=False)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def debian_base(request: pytest.FixtureRequest, node_parts: NodeParts) -> str:
    """The local Debian base image's name (mmdebstrap, once per package list; cached in buildah's storage)."""
    start = time.monotonic()
    name = images.debian_base(log=log(request))
    log(request)(f"base image {name} ready in {time.monotonic() - start:.1f} s")
    return name


@pytest.fixture(scope="session")
def probe_image(request: pytest.FixtureRequest, debian_base: str) -> images.Image:
    context = Path(__file__).parent / "testdata" / "probe"
    image = images.build("probe", context / "Dockerfile", context, build_args={"BASE_IMAGE": debian_base})
    log(request)(f"image {image.name}: " + (f"built in {image.built_s} s" if image.built_s else "cached"))
    return image


def _built(request: pytest.FixtureRequest, image: images.Image) -> images.Image:
    log(request)(f"image {image.name}: " + (f"built in {image.built_s} s" if image.built_s else "cached"))
    return image


@pytest.fixture(scope="session")
def operator_image(request: pytest.FixtureRequest, debian_base: str) -> images.Image:
    """Dockerfile.runtime's operator target itself, on the local Debian base (its PYTHON_IMAGE build argument)."""
    return _built(request, projectimages.operator(debian_base, log=log(request)))


@pytest.fixture(scope="session")
def runtime_cpu_image(request: pytest.FixtureRequest, debian_base: str) -> images.Image:
    """Dockerfile.runtime's CPU runtime (VARIANT=cpu) itself, on the local Debian base; PyPI's torch (projectimages)."""
    return _built(request, projectimages.runtime_cpu(debian_base, log=log(request)))

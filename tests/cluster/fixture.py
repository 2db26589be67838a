"""pytest plugin for the control plane, registered by the root conftest (pytest_plugins).

k8s_cluster      session fixture: one ControlPlane for the whole run (skips, or fails in CI, without binaries)
private_cluster  module fixture: a ControlPlane of the module's own, for tests that crash its components
bare_cluster     module fixture: the same without our CRDs, for tests that install them (helm install)
k8s_namespace    function fixture: a fresh namespace whose default service account exists; deleted afterwards

The binaries are provisioned once after collection, when a selected test is marked `k8s`: a cold build takes
minutes and must not count against the first test's timeout, and the log shows it as its own step.
"""

from __future__ import annotations

import contextlib
import os
import random
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .controlplane import ClusterConfig, ControlPlane
from .provision import HOW_TO_PROVIDE, Binaries, BinariesUnavailable, ensure_binaries

POD_CIDR_ENV = "KUBELLM_TEST_POD_CIDR"
CRDS_DIR_ENV = "KUBELLM_TEST_CRDS_DIR"  # default: the repository's crds/

_binaries_key = pytest.StashKey[Binaries | BinariesUnavailable]()


def _provision(config: pytest.Config) -> Binaries | BinariesUnavailable:
    reporter = config.pluginmanager.get_plugin("terminalreporter")

    def log(message: str) -> None:
        if reporter is not None:
            reporter.write_line(f"[cluster] {message}")

    start = time.monotonic()
    result: Binaries | BinariesUnavailable
    try:
        binaries = ensure_binaries(log=log)
    except BinariesUnavailable as exc:
        result = exc
        log(f"no Kubernetes binaries: {exc}")
    else:
        result = binaries
        log(f"binaries from {binaries.source} ready in {time.monotonic() - start:.1f} s")
    config.stash[_binaries_key] = result
    return result


def pytest_collection_finish(session: pytest.Session) -> None:
    if session.config.option.collectonly:
        return
    if any(item.get_closest_marker("k8s") is not None for item in session.items):
        _provision(session.config)


def _random_loopback_pod_cidr() -> str:
    """A /16 of 127.0.0.0/8 of its own: runtime processes bind to pod IPs, so two clusters on one machine
    (two test sessions, or a test beside `make cluster-up`) must not hand out the same addresses."""
    return f"127.{random.randint(16, 250)}.0.0/16"


def _control_plane(request: pytest.FixtureRequest, state_dir: Path, *, crds: bool = True) -> ControlPlane:
    """A started control plane in state_dir: the session's, or a test's own (skips without binaries). crds: apply
    the repository's CRDs (or KUBELLM_TEST_CRDS_DIR's) at start."""
    binaries = request.config.stash.get(_binaries_key, None) or _provision(request.config)
    if isinstance(binaries, BinariesUnavailable):
        message = str(binaries)
        pytest.skip(f"no Kubernetes binaries: {message}" + ("" if HOW_TO_PROVIDE in message else f": {HOW_TO_PROVIDE}"))
    crds_dir = os.environ.get(CRDS_DIR_ENV)
    config = ClusterConfig(
        pod_cidr=os.environ.get(POD_CIDR_ENV) or _random_loopback_pod_cidr(),
        crds_dir=None if not crds else Path(crds_dir) if crds_dir else ClusterConfig.crds_dir,
    )
    return ControlPlane(binaries, config, state_dir).start()


@contextlib.contextmanager
def _running(request: pytest.FixtureRequest, state_dir: Path, *, crds: bool = True) -> Iterator[ControlPlane]:
    control_plane = _control_plane(request, state_dir, crds=crds)
    try:
        yield control_plane
    finally:
        control_plane.stop()


@pytest.fixture(scope="session")
def k8s_cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    with _running(request, tmp_path_factory.mktemp("cluster")) as control_plane:
        yield control_plane


@pytest.fixture(scope="module")
def private_cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    """A control plane of the test module's own, for tests that crash or restart its components (the session's
    cluster must stay undisturbed for everyone else)."""
    with _running(request, tmp_path_factory.mktemp("private-cluster")) as control_plane:
        yield control_plane


@pytest.fixture(scope="module")
def bare_cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    """A control plane of the test module's own without our CRDs, for what installs them itself (helm install)."""
    with _running(request, tmp_path_factory.mktemp("bare-cluster"), crds=False) as control_plane:
        yield control_plane


@pytest.fixture
def k8s_namespace(k8s_cluster: ControlPlane) -> Iterator[str]:
    with k8s_cluster.namespace() as name:
        yield name

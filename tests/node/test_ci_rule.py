"""The CI rule for `node` tests (tests/conftest.py): where the node's packages are missing, a node test skips on a
developer's machine, naming what to install, and fails in CI."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from ci_probe import run_probe

pytestmark = pytest.mark.slow  # pytest runs in subprocesses

PROBE = "tests/node/test_image_build.py"  # a `node` test without `k8s`: the rule must cover it on its own


def _run_probe(tmp_path: Path, ci: str | None) -> subprocess.CompletedProcess[str]:
    # no containerd, buildah, ... on the PATH: the node's parts are unavailable
    return run_probe(PROBE, ci, PATH=str(tmp_path))


def test_a_node_test_without_its_packages_skips_outside_ci(tmp_path: Path) -> None:
    result = _run_probe(tmp_path, ci=None)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 skipped" in result.stdout
    assert "hack/node-deps.sh" in result.stdout  # the skip says how to provide them


def test_a_node_test_without_its_packages_fails_in_ci(tmp_path: Path) -> None:
    result = _run_probe(tmp_path, ci="true")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "node test skipped in CI" in result.stdout

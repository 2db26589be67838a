"""The root conftest's CI rule: without binaries a `k8s` test skips on a developer's machine and fails in CI."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from ci_probe import run_probe

pytestmark = pytest.mark.slow  # two pytest runs in subprocesses

# Any k8s test that needs the session fixture will do.
PROBE = "tests/k8s/test_controlplane.py::test_apiserver_and_components_are_healthy"


def _run_probe(tmp_path: Path, ci: str | None) -> subprocess.CompletedProcess[str]:
    # A KUBEBUILDER_ASSETS folder without binaries: the fixture cannot start a control plane.
    return run_probe(PROBE, ci, KUBEBUILDER_ASSETS=str(tmp_path))


def test_k8s_test_without_binaries_skips_outside_ci(tmp_path: Path) -> None:
    result = _run_probe(tmp_path, ci=None)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 skipped" in result.stdout
    assert "KUBEBUILDER_ASSETS" in result.stdout  # the skip says how to provide the binaries


def test_k8s_test_without_binaries_fails_in_ci(tmp_path: Path) -> None:
    result = _run_probe(tmp_path, ci="true")
    assert result.returncode == 1, result.stdout + result.stderr
    # The skip happens in the fixture's setup, so pytest reports the failure as an error.
    assert "1 error" in result.stdout and "skipped" not in result.stdout.splitlines()[-1]
    assert "skipped in CI" in result.stdout

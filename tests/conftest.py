"""Root conftest: the control-plane fixtures (cluster.fixture) and the CI rule for `k8s` tests."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

# Subprocesses started by tests (the runtime server, the operator, `python -m cluster`) must not put their working
# directory on sys.path, where the repository's `operator/` folder would shadow the standard library.
os.environ.setdefault("PYTHONSAFEPATH", "1")

pytest_plugins = ["cluster.fixture"]


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """In CI (CI=true) a skipped `k8s` test fails the run: CI must really exercise the control plane."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if report.skipped and _in_ci() and item.get_closest_marker("k8s") is not None and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"k8s test skipped in CI (CI=true), which fails the run: {reason}"

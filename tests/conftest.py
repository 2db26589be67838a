"""Root conftest: the control-plane fixtures (cluster.fixture), the CI rule for `k8s` tests, and the `gpu` tests
selected by the machine (run where a CUDA device is, deselected elsewhere)."""

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
    """In CI (CI=true) a skipped `k8s` or `node` test fails the run: CI must really exercise the control plane and
    the real node."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    marker = next((m for m in ("k8s", "node") if item.get_closest_marker(m) is not None), None)
    if report.skipped and _in_ci() and marker is not None and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"{marker} test skipped in CI (CI=true), which fails the run: {reason}"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`gpu` tests run on a machine with a CUDA device and are deselected (reported as such) elsewhere, so that
    `make test` on a GPU machine runs them instead of silently running neither variant of a kernel test (the
    interpreter variants are skipped where CUDA is present; `make test` runs them in a second pass without it)."""
    if not any(item.get_closest_marker("gpu") for item in items):
        return
    import torch

    if torch.cuda.is_available():
        return
    deselected = [item for item in items if item.get_closest_marker("gpu")]
    config.hook.pytest_deselected(items=deselected)
    items[:] = [item for item in items if not item.get_closest_marker("gpu")]

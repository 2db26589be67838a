"""Fixtures for the end-to-end tests: the operator as a subprocess watching the test's own namespace, and a
process leak check (every process the harness starts carries a tag in its environment; none may outlive the test).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from e2e.operator_process import OperatorProcess
from e2e.procs import MARK_ENV, marked_processes, wait_for


@pytest.fixture
def run_tag(k8s_namespace: str) -> Iterator[str]:
    """The tag of this test's processes (runtimes: `<tag>-runtime`). Torn down last: by then every process tagged
    with it or a `<tag>-...` tag must be gone."""
    yield k8s_namespace
    wait_for(
        lambda: not marked_processes(k8s_namespace),
        timeout=30,
        what=f"every process tagged {MARK_ENV}={k8s_namespace} to exit",
    )


@pytest.fixture
def e2e_operator(k8s_cluster: Any, k8s_namespace: str, run_tag: str, tmp_path: Path) -> Iterator[OperatorProcess]:
    op = OperatorProcess(k8s_namespace, {**k8s_cluster.env(), MARK_ENV: run_tag}, tmp_path / "operator.log").start()
    try:
        yield op
    finally:
        op.stop()

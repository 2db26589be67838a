"""Fixtures for the operator's k8s tests: the operator as a real subprocess (`kubellm operator`, see
e2e/operator_process.py) against the session's control plane, watching only namespaces named `kubellm-op-*` (so it
never touches other tests' objects), and a fresh such namespace per test. One operator serves the whole session
(start-up costs seconds)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from e2e.operator_process import FAST_LOOPS, OperatorProcess

NAMESPACE_PREFIX = "kubellm-op-"
OPERATOR_ENV = {**FAST_LOOPS, "KUBELLM_RUNTIME_IMAGE": "ghcr.io/kubellm/runtime:test"}


def operator_env(k8s_cluster: Any, **extra: str) -> dict[str, str]:
    return {**k8s_cluster.env(), "PYTHONSAFEPATH": "1", **OPERATOR_ENV, **extra}


@pytest.fixture(scope="session")
def kubellm_operator(k8s_cluster: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorProcess]:
    log = tmp_path_factory.mktemp("operator") / "operator.log"
    op = OperatorProcess(f"{NAMESPACE_PREFIX}*", operator_env(k8s_cluster), log).start()
    try:
        yield op
    finally:
        op.stop()
        if os.environ.get("KUBELLM_TEST_SHOW_OPERATOR_LOG"):
            print(op.log_tail(20000))


@pytest.fixture
def api(k8s_cluster: Any) -> Iterator[Any]:
    """A kubernetes ApiClient on the test control plane, closed after the test."""
    api_client = k8s_cluster.api_client()
    try:
        yield api_client
    finally:
        api_client.close()


@pytest.fixture
def op_namespace(k8s_cluster: Any) -> Iterator[str]:
    with k8s_cluster.namespace(NAMESPACE_PREFIX) as name:
        yield name


@pytest.fixture
def operator_process_factory(k8s_cluster: Any) -> Iterator[Callable[..., OperatorProcess]]:
    """Operators the test starts, kills and restarts itself; each stopped at teardown."""
    made: list[OperatorProcess] = []

    def make(namespaces: str, log_path: Path, **env: str) -> OperatorProcess:
        op = OperatorProcess(namespaces, operator_env(k8s_cluster, **env), log_path)
        made.append(op)
        return op

    yield make
    for op in made:
        op.stop()


@pytest.fixture
def private_namespace(k8s_cluster: Any) -> Iterator[str]:
    """A namespace the session's operator does not watch (not `kubellm-op-*`), for a test's own operator."""
    with k8s_cluster.namespace("kubellm-own-") as name:
        yield name

"""Fixtures for the operator's k8s tests: the operator as a real subprocess (`python -m kubellm.operator`) against
the session's control plane, watching only namespaces named `kubellm-op-*` (so it never touches other tests'
objects), and a fresh such namespace per test. One operator serves the whole session (start-up costs seconds)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

NAMESPACE_PREFIX = "kubellm-op-"
# Fast loops for tests: status/autoscaling ticks every half second, short drains.
OPERATOR_ENV = {
    "KUBELLM_TIMER_INTERVAL_SECONDS": "0.5",
    "KUBELLM_METRICS_STATUS_INTERVAL_SECONDS": "0",  # every moved snapshot shows at once
    "KUBELLM_SCRAPE_TIMEOUT_SECONDS": "1",
    "KUBELLM_HANDLER_BACKOFF_SECONDS": "0.5",
    "KUBELLM_DRAIN_SECONDS": "5",
    "KUBELLM_PRESTOP_SLEEP_SECONDS": "1",
    "KUBELLM_RUNTIME_IMAGE": "ghcr.io/kubellm/runtime:test",
}


def wait_for(predicate: Callable[[], Any], *, timeout: float, what: str, interval: float = 0.2) -> Any:
    """Poll until predicate() is truthy; returns its value. Fails with `what` after `timeout` seconds."""
    import time

    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class OperatorProcess:
    """`python -m kubellm.operator` in a subprocess; start/kill/restart at will (the SIGKILL test needs that)."""

    def __init__(self, env: dict[str, str], log_path: Path, namespaces: str) -> None:
        self.env = env
        self.log_path = log_path
        self.namespaces = namespaces
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> OperatorProcess:
        port = _free_port()
        cmd = [
            sys.executable,
            "-m",
            "kubellm.operator",
            "--namespace",
            self.namespaces,
            "--liveness",
            f"http://127.0.0.1:{port}/healthz",
        ]
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        log.close()

        def healthy() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"the operator exited ({self.proc.returncode}):\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as r:
                    return r.status == 200
            except OSError:
                return False

        wait_for(healthy, timeout=60, what="the operator's liveness endpoint")
        return self

    def kill(self) -> None:
        """SIGKILL: no cleanup, no chance to finish what it was doing."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()

    def log_tail(self, limit: int = 4000) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return text[-limit:]


def operator_env(k8s_cluster: Any, **extra: str) -> dict[str, str]:
    return {**k8s_cluster.env(), "PYTHONSAFEPATH": "1", **OPERATOR_ENV, **extra}


@pytest.fixture(scope="session")
def kubellm_operator(k8s_cluster: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorProcess]:
    log = tmp_path_factory.mktemp("operator") / "operator.log"
    op = OperatorProcess(operator_env(k8s_cluster), log, f"{NAMESPACE_PREFIX}*").start()
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
        op = OperatorProcess(operator_env(k8s_cluster, **env), log_path, namespaces)
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

"""`kubellm operator` as a subprocess against a cluster, watching one namespace, with fast loops for tests."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

from .procs import die_with_parent, wait_for

# Ticks every half second (autoscaling still evaluates only every spec.autoscaling.evaluationPeriodSeconds);
# short drains so that a removed replica's runtime stops within seconds.
FAST_LOOPS = {
    "KUBELLM_TIMER_INTERVAL_SECONDS": "0.5",
    "KUBELLM_METRICS_STATUS_INTERVAL_SECONDS": "0",  # the observer sees every moved snapshot
    "KUBELLM_SCRAPE_TIMEOUT_SECONDS": "1",
    "KUBELLM_HANDLER_BACKOFF_SECONDS": "0.5",
    "KUBELLM_DRAIN_SECONDS": "5",
    "KUBELLM_PRESTOP_SLEEP_SECONDS": "1",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def kubellm_command(subcommand: str) -> list[str]:
    """The `kubellm` console script beside this interpreter, else the same entry point through `python -m`."""
    script = Path(sys.executable).with_name("kubellm")
    base = [str(script)] if script.exists() else [sys.executable, "-m", "kubellm.runtime.cli"]
    return [*base, subcommand]


class OperatorProcess:
    """Start with `start()`, stop with `stop()` (SIGTERM, then SIGKILL after a grace period)."""

    def __init__(self, namespace: str, env: dict[str, str], log_path: Path) -> None:
        self.namespace = namespace
        self.env = {**FAST_LOOPS, **env, "PYTHONSAFEPATH": "1"}  # the caller may override a FAST_LOOPS value
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> OperatorProcess:
        port = _free_port()
        cmd = [
            *kubellm_command("operator"),
            "--namespace",
            self.namespace,
            "--liveness",
            f"http://127.0.0.1:{port}/healthz",
        ]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent
            )

        def healthy() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"the operator exited ({self.proc.returncode}):\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as r:
                    return r.status == 200
            except OSError:
                return False

        wait_for(healthy, timeout=timeout, what="the operator's liveness endpoint")
        return self

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: no cleanup, no chance to finish what it was doing (the crash tests restart it after)."""
        if self.running:
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait(timeout=10)

    def stop(self, grace: float = 15.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def log_tail(self, limit: int = 4000) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return text[-limit:]

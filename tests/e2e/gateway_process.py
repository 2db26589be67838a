"""`kubellm gateway` as a subprocess against a cluster, watching one namespace (the gateway tests and
bench/gateway.py share it)."""

from __future__ import annotations

import signal
import subprocess
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from .operator_process import _free_port, kubellm_command
from .procs import die_with_parent, wait_for


class GatewayProcess:
    def __init__(
        self, namespace: str, env: dict[str, str], log_path: Path, *args: str, port: int | None = None
    ) -> None:
        self.namespace, self.log_path, self.args = namespace, log_path, list(args)
        self.env = {**env, "PYTHONSAFEPATH": "1"}
        self.port = port or _free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> GatewayProcess:
        cmd = [*kubellm_command("gateway"), "--namespace", self.namespace, "--port", str(self.port), *self.args]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent
            )

        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"the gateway exited ({self.proc.returncode}):\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/ready", timeout=1) as r:
                    return r.status == 200
            except OSError:
                return False

        wait_for(ready, timeout=timeout, what="the gateway's /ready")
        return self

    def stop(self, grace: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def metric(self, name: str, **labels: str) -> float:
        """The sum of the gateway's samples `name` whose labels include `labels`."""
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=5) as r:
            text = r.read().decode()
        total = 0.0
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    total += sample.value
        return total

    def log_tail(self, limit: int = 4000) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return text[-limit:]

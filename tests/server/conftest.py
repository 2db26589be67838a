"""Real `kubellm serve` processes on loopback, serving the bundled SmolLM2 on the CPU.

- ``server`` (session): the shared server every black-box test talks to (``server.url("/v1")``).
- ``spawn_server`` (module-scoped factory): a server of its own with extra flags, stopped at the end of the module;
  for the few tests that need different flags (auth, a tiny queue, SIGTERM).
- ``tokenizer`` (session): SmolLM2's tokenizer, loaded in the test process, to check usage counts.

A server listens on ``--port 0``; its port is read from its log line ``listening on http://HOST:PORT``, so no
port is ever guessed. Readiness is ``GET /ready`` answering 200.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

MODEL = "builtin:smollm2-135m-instruct"
SERVED_NAME = "smollm2"
START_TIMEOUT_S = 240.0
_LISTENING = re.compile(r"listening on http://([\d.]+):(\d+)")


class ServerProcess:
    """One `kubellm serve` subprocess; its output goes to a file so that a full pipe can never stall it."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        self.log_path = Path(tempfile.mkstemp(prefix="kubellm-serve-", suffix=".log")[1])
        full_env = {**os.environ, "PYTHONSAFEPATH": "1", **(env or {})}
        # `python -m kubellm.runtime.server.cli` is `kubellm serve` without the other subcommands' imports.
        self.args = [
            sys.executable,
            "-P",
            "-m",
            "kubellm.runtime.server.cli",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            *args,
        ]
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT, env=full_env)
        self.port: int | None = None

    @property
    def base(self) -> str:
        assert self.port is not None, "server not started"
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str = "") -> str:
        return self.base + path

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_text()[-4000:]}")
            if self.port is None:
                match = _LISTENING.search(self.log_text())
                if match:
                    self.port = int(match.group(2))
            if self.port is not None and self.get_status("/ready") == 200:
                return
            time.sleep(0.2)
        raise TimeoutError(f"server not ready after {timeout} s:\n{self.log_text()[-4000:]}")

    def get_status(self, path: str, headers: dict[str, str] | None = None) -> int | None:
        try:
            with urllib.request.urlopen(urllib.request.Request(self.url(path), headers=headers or {}), timeout=5) as r:
                return int(r.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)
        except OSError:
            return None

    def request(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None, timeout: float = 120
    ) -> tuple[int, dict[str, str], bytes]:
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            self.url(path), data=data, method=method, headers={"Content-Type": "application/json", **(headers or {})}
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return int(r.status), dict(r.headers), r.read()
        except urllib.error.HTTPError as exc:
            return int(exc.code), dict(exc.headers), exc.read()

    def metrics(self) -> dict[str, list[tuple[dict[str, str], float]]]:
        """/metrics parsed with prometheus_client's own parser: sample name -> [(labels, value)]."""
        from prometheus_client.parser import text_string_to_metric_families

        status, _, body = self.request("GET", "/metrics")
        assert status == 200
        samples: dict[str, list[tuple[dict[str, str], float]]] = {}
        for family in text_string_to_metric_families(body.decode()):
            for s in family.samples:
                samples.setdefault(s.name, []).append((dict(s.labels), float(s.value)))
        return samples

    def metric(self, name: str) -> float:
        values = self.metrics().get(name)
        assert values, f"{name} missing from /metrics"
        return values[0][1]

    def wait_idle(self, timeout: float = 60.0) -> None:
        """Until no request runs or waits and every KV block is free (the engine's own view, via /metrics)."""
        deadline = time.monotonic() + timeout
        last: tuple[float, float, float] = (-1, -1, -1)
        while time.monotonic() < deadline:
            last = (
                self.metric("vllm:num_requests_running"),
                self.metric("vllm:num_requests_waiting"),
                self.metric("vllm:kv_cache_usage_perc"),
            )
            if last == (0.0, 0.0, 0.0):
                return
            time.sleep(0.1)
        raise AssertionError(f"server not idle after {timeout} s: running, waiting, kv usage = {last}")

    def stop(self, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return int(self.proc.returncode)


# float32 and plain weights whatever the CPU: greedy outputs are then batch invariant, which many tests here compare
# exactly (a stream alone vs in a batch, preempted vs not, a token scored vs generated). An AVX-512 CPU with bf16
# units would otherwise serve bfloat16 with int4 layers by default, whose kernels round differently at different
# batch sizes (as vLLM's default kernels do); that path's numerics are tested against transformers in
# tests/runtime/test_model_hf.py and tests/quantization/.
BASE_ARGS = [
    "--model",
    MODEL,
    "--served-model-name",
    SERVED_NAME,
    "--max-model-len",
    "1024",
    "--drain-timeout",
    "20",
    "--dtype",
    "float32",
    "--quantization",
    "none",
]


@pytest.fixture(scope="session")
def server() -> Iterator[ServerProcess]:
    proc = ServerProcess([*BASE_ARGS, "--max-num-seqs", "64"])
    try:
        proc.wait_ready()
        yield proc
        # Everything the tests threw at it, hostile requests included, left no traceback and a clean exit.
        status = proc.stop()
        log = proc.log_text()
        assert "Traceback" not in log, log[log.index("Traceback") - 2000 :][:6000]
        assert status == 0, log[-3000:]
    finally:
        proc.stop()
        proc.log_path.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def spawn_server() -> Iterator[Callable[..., ServerProcess]]:
    started: list[ServerProcess] = []

    def spawn(*args: str, env: dict[str, str] | None = None) -> ServerProcess:
        proc = ServerProcess([*BASE_ARGS, *args], env=env)
        started.append(proc)
        proc.wait_ready()
        return proc

    yield spawn
    for proc in started:
        proc.stop()
        proc.log_path.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def tokenizer() -> Any:
    from kubellm.runtime.models.loader import load_model

    loaded = load_model(MODEL, load_format="dummy")
    assert loaded.tokenizer is not None
    return loaded.tokenizer

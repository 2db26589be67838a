"""The closed loop, end to end: the operator renders a Deployment; for each of its pods (kwok hands out loopback
IPs) this test plays the kubelet and starts the REAL runtime with the container's own arguments on the pod's IP;
load sent with the official openai client piles up requests, the runtime's /metrics report them, the operator
scales up; when the load stops it scales back down."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from cluster import wait_until
from kubernetes import client

from kubellm.operator import constants as c

pytestmark = [pytest.mark.k8s, pytest.mark.slow]

# Runs `kubellm serve ...` through the server module (the `kubellm` entry point is the same function).
SERVE = (
    "import argparse, sys; from kubellm.runtime.server import cli; "
    "p = argparse.ArgumentParser(); cli.add_arguments(p); sys.exit(cli.run(p.parse_args(sys.argv[1:])))"
)


class Kubelet:
    """Starts the pod's runtime container as a local process on the pod's IP; stops it when the pod goes."""

    def __init__(self, api: Any, namespace: str, instance: str, log_dir: Path, env: dict[str, str]) -> None:
        self.core: Any = client.CoreV1Api(api)
        self.namespace, self.instance, self.log_dir, self.env = namespace, instance, log_dir, env
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.started: list[str] = []  # every pod a runtime was started for (name@IP), for failure reports
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> Kubelet:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=10)
        for proc in self.procs.values():
            self._terminate(proc)

    @staticmethod
    def _terminate(proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()

    def _start(self, pod: Any) -> None:
        (container,) = pod.spec.containers
        assert container.command == ["kubellm"]
        args = list(container.args)
        assert args[0] == "serve"
        args[args.index("--host") + 1] = pod.status.pod_ip  # 0.0.0.0 in a pod's own network namespace
        log = (self.log_dir / f"{pod.metadata.name}.log").open("wb")
        self.started.append(f"{pod.metadata.name}@{pod.status.pod_ip}")
        self.procs[pod.status.pod_ip] = subprocess.Popen(
            [sys.executable, "-c", SERVE, *args[1:], "--device", "cpu"], env=self.env, stdout=log, stderr=log
        )
        log.close()

    def report(self) -> str:
        """What went wrong, for a failing assertion: errors of the loop and the runtimes' log tails."""
        tails = [f"--- {p.name}\n{p.read_text(errors='replace')[-1500:]}" for p in sorted(self.log_dir.glob("*.log"))]
        return "\n".join([f"started: {self.started}", *self.errors, *tails])

    def _loop(self) -> None:
        while not self.stop.is_set():
            try:
                self._sync()
            except Exception as exc:  # keep playing the kubelet; the test reports what failed
                self.errors.append(f"{type(exc).__name__}: {exc}")
            self.stop.wait(0.3)

    def _sync(self) -> None:
        selector = f"{c.LABEL_INSTANCE}={self.instance}"
        pods = self.core.list_namespaced_pod(self.namespace, label_selector=selector).items
        live = {p.status.pod_ip for p in pods if p.status.pod_ip and not p.metadata.deletion_timestamp}
        for pod in pods:
            if pod.status.pod_ip in live and pod.status.pod_ip not in self.procs:
                self._start(pod)
        for ip in [ip for ip in self.procs if ip not in live]:
            self._terminate(self.procs.pop(ip))


def _is_ready(ip: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://{ip}:{c.CONTAINER_PORT}/ready", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def _wait(kubelet: Kubelet, predicate: Any, timeout: float, what: str, interval: float = 0.5) -> Any:
    try:
        return wait_until(predicate, timeout=timeout, what=what, interval=interval)
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\n{kubelet.report()}") from None


def test_runtime_metrics_drive_scale_up_and_down(
    k8s_cluster: Any, kubellm_operator: Any, op_namespace: str, tmp_path: Path
) -> None:
    import openai

    api = k8s_cluster.api_client()
    custom: Any = client.CustomObjectsApi(api)
    spec = {
        "model": {"source": "builtin:smollm2-135m-instruct"},
        "replicas": 1,
        "resources": {"gpus": 0},
        # Two sequences at a time: a handful of concurrent requests is a queue.
        "engine": {"maxNumSeqs": 2, "maxNumBatchedTokens": 512},
        "autoscaling": {
            "enabled": True,
            "minReplicas": 1,
            "maxReplicas": 2,
            "targetQueueDepth": 2,
            "evaluationPeriodSeconds": 1,
            "scaleDownStabilizationSeconds": 5,
        },
    }
    body = {"apiVersion": c.API_VERSION, "kind": c.KIND, "metadata": {"name": "loop"}, "spec": spec}
    custom.create_namespaced_custom_object(c.GROUP, c.VERSION, op_namespace, c.PLURAL, body)

    def llmd() -> dict[str, Any]:
        return dict(custom.get_namespaced_custom_object(c.GROUP, c.VERSION, op_namespace, c.PLURAL, "loop"))

    env = {**k8s_cluster.env(), "PYTHONSAFEPATH": "1", "OMP_NUM_THREADS": "1"}
    with Kubelet(api, op_namespace, "loop", tmp_path, env) as kubelet:
        ip = _wait(kubelet, lambda: next(iter(kubelet.procs), None), 60, "the first pod's runtime")
        _wait(kubelet, lambda: _is_ready(ip), 240, "the runtime to load the model")
        _wait(
            kubelet,
            lambda: ((llmd().get("status") or {}).get("metrics") or {}).get("podsScraped") == 1,
            30,
            "the operator scraping the runtime",
        )
        assert llmd()["spec"]["replicas"] == 1

        # Load: 10 clients in a loop; with 2 sequences at a time about 8 wait -> 4/replica against a target of 2.
        stop_load = threading.Event()
        completions = []

        def client_loop() -> None:
            oa = openai.OpenAI(base_url=f"http://{ip}:{c.CONTAINER_PORT}/v1", api_key="unused", max_retries=0)
            while not stop_load.is_set():
                try:
                    r = oa.completions.create(model="loop", prompt="Count to fifty:", max_tokens=24, temperature=0)
                    completions.append(r.choices[0].text)
                except openai.APIError:
                    time.sleep(0.1)

        clients = [threading.Thread(target=client_loop, daemon=True) for _ in range(10)]
        for t in clients:
            t.start()
        try:
            obj = _wait(kubelet, lambda: (o := llmd())["spec"]["replicas"] == 2 and o, 120, "a scale-up")
        finally:
            stop_load.set()
        up = obj["status"]["scalingDecisions"][-1]
        assert (up["fromReplicas"], up["toReplicas"]) == (1, 2)
        assert "queue" in up["reason"]
        for t in clients:
            t.join(timeout=90)  # each finishes the request it has in flight
        assert completions and all(isinstance(text, str) for text in completions), "the runtime answered nothing"

        # The second pod's runtime loads (until it answers, its failed scrapes hold replicas at 2); with the load
        # gone, back to one replica after the stabilization window.
        obj = _wait(kubelet, lambda: (o := llmd())["spec"]["replicas"] == 1 and o, 240, "a scale-down")
        # Both replicas really served: two runtime logs reached readiness.
        served = [p for p in tmp_path.glob("*.log") if "ready: serving loop" in p.read_text(errors="replace")]
        assert len(served) >= 2, kubelet.report()
        down = obj["status"]["scalingDecisions"][-1]
        assert (down["fromReplicas"], down["toReplicas"]) == (2, 1)
    api.close()

"""A kubelet stand-in: for each pod of one LLMDeployment that has an IP (kwok hands out loopback addresses),
start the pod's REAL runtime container as a local process bound to that IP, and stop it when the pod goes away
(its preStop sleep first, then SIGTERM, as a kubelet does).

The container's own command and arguments are used as the operator rendered them; only `--host 0.0.0.0` becomes
the pod's IP (in a cluster each pod has its own network namespace; here all share the loopback). kwok marks pods
Ready at once, before their runtime has loaded its model: exactly the window in which a scrape fails.
`hold()` keeps newly seen pods from starting (an image pull that takes a while) until `release()`.
"""

from __future__ import annotations

import subprocess
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .operator_process import kubellm_command
from .procs import MARK_ENV, die_with_parent

PORT = 8000  # the container port the operator scrapes (kubellm.operator.constants.CONTAINER_PORT)
POLL_SECONDS = 0.25


@dataclass
class PodRuntime:
    """One pod as the stand-in saw it. Times are time.monotonic()."""

    name: str
    ip: str
    seen_at: float
    proc: subprocess.Popen[bytes] | None = None
    ready_at: float | None = None  # first seen Ready in the API (kwok: at once, whatever the runtime does)
    started_at: float | None = None
    # First /ready 200: the model is loaded, which is also when /metrics starts carrying the vLLM gauges (while
    # loading, /metrics answers without them and the operator counts the scrape as failed).
    serving_at: float | None = None
    stopped_at: float | None = None  # the pod was deleted (the kubelet runs preStop, then SIGTERM)
    prestop_seconds: float = 0.0  # the container's preStop sleep
    signalled_at: float | None = None  # SIGTERM sent
    exit_reported: bool = False
    log_path: Path | None = None
    args: list[str] = field(default_factory=list)

    def url(self, path: str) -> str:
        return f"http://{self.ip}:{PORT}{path}"


def http_ok(url: str, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def _is_ready(pod: Any) -> bool:
    return any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or ())


class RuntimeKubelet:
    """Use as a context manager; exiting stops every runtime it started and waits for them."""

    def __init__(
        self,
        api: Any,
        namespace: str,
        instance: str,
        log_dir: Path,
        env: dict[str, str],
        *,
        tag: str,
        max_pods: int = 3,
    ) -> None:
        from kubernetes import client

        self.core: Any = client.CoreV1Api(api)
        self.namespace = namespace
        self.selector = f"app.kubernetes.io/instance={instance}"
        self.log_dir = log_dir
        # OMP_NUM_THREADS=1: two runtimes share two cores with the control plane and the operator.
        self.env = {**env, "PYTHONSAFEPATH": "1", "OMP_NUM_THREADS": "1", MARK_ENV: tag}
        self.max_pods = max_pods  # each runtime holds ~1 GB: more pods than this is a runaway scale-up
        self.pods: dict[str, PodRuntime] = {}  # by pod name, including stopped ones
        self.errors: list[str] = []
        self._held = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="kubelet", daemon=True)

    def __enter__(self) -> RuntimeKubelet:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        with self._lock:
            pods = list(self.pods.values())
            for pod in pods:
                self._terminate(pod)
                self._signal(pod)  # no preStop pause at teardown
        for pod in pods:
            if pod.proc is None:
                continue
            try:
                pod.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pod.proc.kill()
                pod.proc.wait(timeout=10)

    # -- what the test reads ------------------------------------------------------------------------------------

    def hold(self) -> None:
        """Pods seen from now on wait (image pull) until release()."""
        self._held = True

    def release(self) -> None:
        self._held = False

    def live(self) -> list[PodRuntime]:
        with self._lock:
            return [p for p in self.pods.values() if p.stopped_at is None]

    def serving(self) -> list[PodRuntime]:
        """Live pods whose runtime is ready. Raises if a runtime died on its own (see check())."""
        self.check()
        return [p for p in self.live() if p.serving_at is not None]

    def check(self) -> None:
        """Fail fast when a runtime exited without being told to (e.g. its pod IP's port is taken by another
        process: clusters started side by side with the same pod CIDR hand out the same loopback addresses)."""
        if self.errors:
            raise AssertionError("the kubelet stand-in failed:\n" + self.report())

    def all_exited(self) -> bool:
        with self._lock:
            return all(p.proc is None or p.proc.poll() is not None for p in self.pods.values())

    def report(self) -> str:
        """For a failing assertion: the loop's errors and each runtime's log tail."""
        lines = list(self.errors)
        with self._lock:
            for pod in self.pods.values():
                code = None if pod.proc is None else pod.proc.poll()
                lines.append(f"--- pod {pod.name} ip {pod.ip} started={pod.started_at} exit={code}")
                if pod.log_path is not None and pod.log_path.exists():
                    lines.append(pod.log_path.read_text(errors="replace")[-1500:])
        return "\n".join(lines)

    # -- the loop -----------------------------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._sync()
                self._probe()
                self._signal_due()
                self._reap()
                self._check_exits()
            except Exception as exc:  # keep playing the kubelet; the test reports what went wrong
                self.errors.append(f"{time.monotonic():.1f} {type(exc).__name__}: {exc}")
            self._stop.wait(POLL_SECONDS)

    def _sync(self) -> None:
        items = self.core.list_namespaced_pod(self.namespace, label_selector=self.selector).items
        # A pod marked for deletion (or gone: kwok removes deleted pods at once) gets its preStop pause, then SIGTERM.
        present = {p.metadata.name: p for p in items if p.status.pod_ip and not p.metadata.deletion_timestamp}
        now = time.monotonic()
        with self._lock:
            for name, pod in present.items():
                known = self.pods.get(name)
                if known is None:
                    known = self.pods[name] = PodRuntime(name=name, ip=pod.status.pod_ip, seen_at=now)
                if known.ready_at is None and _is_ready(pod):
                    known.ready_at = now
                if known.proc is None and known.stopped_at is None and not self._held:
                    running = sum(1 for p in self.pods.values() if p.proc is not None and p.stopped_at is None)
                    if running >= self.max_pods:
                        raise RuntimeError(f"pod {name}: {running} runtimes already run (cap {self.max_pods})")
                    self._start(known, pod)
            for pod_runtime in self.pods.values():
                if pod_runtime.name not in present and pod_runtime.stopped_at is None:
                    self._terminate(pod_runtime)

    def _start(self, pod: PodRuntime, obj: Any) -> None:
        (container,) = obj.spec.containers
        if list(container.command or []) != ["kubellm"] or not container.args or container.args[0] != "serve":
            raise RuntimeError(f"pod {pod.name}: unexpected container command {container.command} {container.args}")
        args = self._mount_config(pod, obj, container, list(container.args[1:]))
        # The pod's own IP, as its network namespace would give it (a flag: it overrides the config file).
        args += ["--host", pod.ip]
        pod.args = args
        pod.log_path = self.log_dir / f"{pod.name}.log"
        with pod.log_path.open("wb") as log:
            pod.proc = subprocess.Popen(
                [*kubellm_command("serve"), *args],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent,
            )
        pod.started_at = time.monotonic()
        lifecycle = container.lifecycle
        sleep = getattr(getattr(lifecycle, "pre_stop", None), "sleep", None)
        pod.prestop_seconds = float(sleep.seconds) if sleep is not None else 0.0

    def _mount_config(self, pod: PodRuntime, obj: Any, container: Any, args: list[str]) -> list[str]:
        """What the kubelet does for configMap volumes: the ConfigMap's keys as files under the mount path. The
        `--config` path is rewritten to where this fake kubelet put them."""
        volumes = {v.name: v for v in obj.spec.volumes or [] if v.config_map is not None}
        for mount in container.volume_mounts or []:
            volume = volumes.get(mount.name)
            if volume is None:
                continue
            data = self.core.read_namespaced_config_map(volume.config_map.name, self.namespace).data or {}
            folder = self.log_dir / pod.name / mount.mount_path.strip("/").replace("/", "_")
            folder.mkdir(parents=True, exist_ok=True)
            for key, text in data.items():
                (folder / key).write_text(text)
            args = [
                str(folder) + a[len(mount.mount_path) :] if a.startswith(mount.mount_path + "/") else a for a in args
            ]
        return args

    def _probe(self) -> None:
        """Until SIGTERM (the preStop pause included), as the readiness probe would: a runtime that became ready
        just before its pod was removed is still seen serving."""
        with self._lock:
            pods = [p for p in self.pods.values() if p.proc is not None and p.signalled_at is None]
        for pod in pods:
            if pod.serving_at is None and http_ok(pod.url("/ready"), timeout=0.5):
                pod.serving_at = time.monotonic()

    def _terminate(self, pod: PodRuntime) -> None:
        """The pod is gone: SIGTERM comes after its preStop pause (see _signal_due)."""
        pod.stopped_at = pod.stopped_at or time.monotonic()

    def _signal(self, pod: PodRuntime) -> None:
        """SIGTERM, without waiting: the runtime drains in-flight requests (--drain-timeout) and exits 0."""
        if pod.signalled_at is None:
            pod.signalled_at = time.monotonic()
            if pod.proc is not None and pod.proc.poll() is None:
                pod.proc.terminate()

    def _signal_due(self) -> None:
        now = time.monotonic()
        with self._lock:
            for pod in self.pods.values():
                if pod.stopped_at is not None and now >= pod.stopped_at + pod.prestop_seconds:
                    self._signal(pod)

    def _check_exits(self) -> None:
        with self._lock:
            for pod in self.pods.values():
                code = None if pod.proc is None else pod.proc.poll()
                if code is not None and pod.signalled_at is None and not pod.exit_reported:
                    pod.exit_reported = True
                    self.errors.append(f"the runtime of pod {pod.name} ({pod.ip}) exited on its own with code {code}")

    def _reap(self, grace: float = 20.0) -> None:
        """SIGKILL runtimes that outlived their grace period after SIGTERM."""
        now = time.monotonic()
        with self._lock:
            for pod in self.pods.values():
                late = pod.signalled_at is not None and now - pod.signalled_at > grace
                if late and pod.proc is not None and pod.proc.poll() is None:
                    pod.proc.kill()

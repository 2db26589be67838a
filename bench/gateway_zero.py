"""From the first request for a model at zero replicas to its first token, split by what happened in between, each
moment taken from the part that saw it (bench/gateway.py runs it as its `zero` section, or alone with --zero):

    client sends a stream ─▶ gateway: arrives, held                   (its access log: `time`)
      ─▶ wake annotation written on the LLMDeployment                  (a watch on it, in this process)
      ─▶ operator: LLMDeployment spec.replicas 1, Deployment replicas 1 (watches)
      ─▶ ReplicaSet creates the pod, the scheduler binds it            (a watch on pods: ADDED, spec.nodeName)
      ─▶ kwok: pod IP and Ready (the pod is Ready in the API before its runtime is: kwok runs no probe)
      ─▶ the stand-in kubelet starts `kubellm serve`                   (its Popen, tests/e2e/kubelet.py)
      ─▶ runtime: listening (imports done), model loaded and ready     (the runtime's own log lines)
      ─▶ gateway forwards the held request                             (its access log: `forwarded_s`)
      ─▶ first token at the client, last chunk                         (the client)

Every moment is on this process's monotonic clock, in seconds after the client sent the request; the wall-clock
ones (log lines) are converted through one offset read at the start. The stand-in kubelet lists pods every
0.25 s (tests/e2e/kubelet.py), so `runtime_started` carries up to that much of its polling.
"""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.request
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from e2e.gateway_process import GatewayProcess
from e2e.kubelet import RuntimeKubelet
from e2e.observer import GROUP, PLURAL, VERSION
from e2e.procs import wait_for

from kubellm import contract

ZERO_NAME = ZERO_SERVED = "sleepy"
# the runtime's log format (runtime/server/cli.py): "%(asctime)s %(levelname)s %(name)s: %(message)s"
_LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) ")
STEPS = (  # (step, from, to): the split the result reports
    ("to_gateway", "request_sent", "gateway_received"),
    ("wake", "gateway_received", "wake_written"),  # the gateway gathers a burst for wake_gather_seconds (0.5) first
    ("operator_scale", "wake_written", "deployment_scaled"),
    ("schedule", "deployment_scaled", "pod_scheduled"),
    ("runtime_start", "pod_scheduled", "runtime_started"),
    ("runtime_imports", "runtime_started", "runtime_listening"),
    ("model_load", "runtime_listening", "model_ready"),
    ("gateway_forward", "model_ready", "gateway_forwarded"),
    ("first_token", "gateway_forwarded", "first_token"),
)


class Moments:
    """First times things were seen, on time.monotonic(); `wall` converts a wall-clock time (time.time()) to it."""

    def __init__(self) -> None:
        self.at: dict[str, float] = {}
        self._lock = threading.Lock()
        self._offset = time.time() - time.monotonic()

    def first(self, name: str, at: float | None = None) -> None:
        with self._lock:
            self.at.setdefault(name, time.monotonic() if at is None else at)

    def wall(self, epoch: float) -> float:
        return epoch - self._offset


Check = tuple[str, Callable[[str, Any], bool]]


def _watch(
    moments: Moments, stop: threading.Event, list_fn: Callable[..., Any], args: tuple[Any, ...],
    kwargs: dict[str, Any], checks: list[Check], resource_version: str,
) -> None:  # fmt: skip
    """One watch from `resource_version` (that of a list taken before the request, so no event is missed however
    late this thread connects), reconnecting until `stop`: each check is recorded the first time it holds."""
    from kubernetes import watch

    while not stop.is_set():
        w = watch.Watch()
        for event in w.stream(list_fn, *args, resource_version=resource_version, timeout_seconds=2, **kwargs):
            for name, check in checks:
                if check(event["type"], event["object"]):
                    moments.first(name)
            if stop.is_set():
                w.stop()
        resource_version = w.resource_version or resource_version


def _llmd_checks() -> list[Check]:
    def annotations(obj: Any) -> dict[str, str]:
        return dict((obj.get("metadata") or {}).get("annotations") or {})

    return [
        ("wake_written", lambda _, o: contract.ANNOTATION_WAKE in annotations(o)),
        ("llmd_scaled", lambda _, o: int((o.get("spec") or {}).get("replicas") or 0) >= 1),
    ]


def _pod_checks() -> list[Check]:
    def ready(pod: Any) -> bool:
        return any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or ())

    return [
        ("pod_created", lambda kind, _: kind == "ADDED"),
        ("pod_scheduled", lambda _, p: bool(p.spec.node_name)),
        ("pod_ready_in_api", lambda _, p: ready(p)),
    ]


def start_watches(cp: Any, namespace: str, moments: Moments, stop: threading.Event) -> list[threading.Thread]:
    """List each kind (the state before the request: what already holds is recorded now), then watch it from there."""
    from kubernetes import client

    selector = f"app.kubernetes.io/instance={ZERO_NAME}"
    custom: Any = client.CustomObjectsApi(cp.api_client())  # a client each: they are used from their own threads
    apps: Any = client.AppsV1Api(cp.api_client())
    core: Any = client.CoreV1Api(cp.api_client())
    specs: list[tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any], list[Check]]] = [
        (custom.list_namespaced_custom_object, (GROUP, VERSION, namespace, PLURAL),
         {"field_selector": f"metadata.name={ZERO_NAME}"}, _llmd_checks()),
        (apps.list_namespaced_deployment, (namespace,), {"label_selector": selector},
         [("deployment_scaled", lambda _, d: (d.spec.replicas or 0) >= 1)]),
        (core.list_namespaced_pod, (namespace,), {"label_selector": selector}, _pod_checks()),
    ]  # fmt: skip
    threads = []
    for list_fn, args, kwargs, checks in specs:
        listed = list_fn(*args, **kwargs)
        items = listed["items"] if isinstance(listed, dict) else listed.items
        version = (
            listed["metadata"]["resourceVersion"] if isinstance(listed, dict) else listed.metadata.resource_version
        )
        for item in items:
            for name, check in checks:
                if check("ADDED", item):
                    raise AssertionError(f"{name} holds before the request: {ZERO_NAME} is not at zero")
        thread = threading.Thread(
            target=_watch, args=(moments, stop, list_fn, args, kwargs, checks, version), name="watch", daemon=True
        )
        thread.start()
        threads.append(thread)
    return threads


def runtime_log_moments(log_path: Path, moments: Moments) -> None:
    """The runtime's own lines: `listening on ... (model loading)` once its imports are done, `ready: serving` once
    the model is loaded (its asctime: local time, milliseconds)."""
    for line in log_path.read_text(errors="replace").splitlines():
        match = _LOG_TIME.match(line)
        if match is None:
            continue
        epoch = time.mktime(time.strptime(match[1], "%Y-%m-%d %H:%M:%S")) + int(match[2]) / 1000
        if "listening on http" in line:
            moments.first("runtime_listening", moments.wall(epoch))
        elif "ready: serving" in line:
            moments.first("model_ready", moments.wall(epoch))


def gateway_log_moments(log_path: Path, moments: Moments) -> dict[str, Any] | None:
    """The access line of the held chat request (returned: its retries say how often a replica not yet serving
    was tried): when it arrived, and when it was sent on to the replica."""
    for line in log_path.read_text(errors="replace").splitlines():
        if not line.startswith("{"):
            continue
        entry: dict[str, Any] = json.loads(line)
        if entry.get("route") == "/v1/chat/completions" and entry.get("model") == ZERO_SERVED:
            arrived = moments.wall(datetime.fromisoformat(entry["time"]).timestamp())
            moments.first("gateway_received", arrived)
            if entry.get("forwarded_s") is not None:
                moments.first("gateway_forwarded", arrived + entry["forwarded_s"])
            return entry
    return None


def stream_once(base_url: str, moments: Moments) -> str:
    import openai

    oai = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=600)
    # the client's first call imports and builds its types (~0.5 s): done before the clock starts
    oai.models.list()
    _ = oai.chat.completions, openai.types.chat.ChatCompletionChunk
    moments.first("request_sent")
    stream = oai.chat.completions.create(
        model=ZERO_SERVED,
        messages=[{"role": "user", "content": "Name three colors."}],
        max_tokens=16,
        temperature=0,
        stream=True,
    )
    text = ""
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            moments.first("first_token")
            text += chunk.choices[0].delta.content
    moments.first("last_chunk")
    return text


def zero_spec(base: dict[str, Any]) -> dict[str, Any]:
    autoscaling = {"enabled": True, "minReplicas": 0, "maxReplicas": 1, "scaleToZeroAfterSeconds": 3600}
    return {**base, "model": {**base["model"], "servedModelName": ZERO_SERVED}, "autoscaling": autoscaling}


def split(moments: Moments) -> dict[str, Any]:
    t0 = moments.at["request_sent"]
    timeline = {k: round(v - t0, 3) for k, v in sorted(moments.at.items(), key=lambda kv: kv[1])}
    steps = {}
    for step, start, end in STEPS:
        if start in timeline and end in timeline:
            steps[f"{step}_s"] = round(timeline[end] - timeline[start], 3)
    return {"timeline_s": timeline, "steps": steps, "total_to_first_token_s": timeline.get("first_token")}


def measure_zero(
    cp: Any, namespace: str, base_spec: dict[str, Any], tmp: Path, env: dict[str, str], tag: str
) -> dict[str, Any]:
    """Create the model at zero, wait for the gateway to list it, send one stream, and return its timeline."""
    from kubernetes import client

    api = cp.api_client()
    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "LLMDeployment", "metadata": {"name": ZERO_NAME}}
    client.CustomObjectsApi(api).create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, {**body, "spec": {**zero_spec(base_spec), "replicas": 0}}
    )
    logs = tmp / "zero"
    logs.mkdir()
    gateway = GatewayProcess(namespace, env, logs / "gateway.log").start()
    moments, stop = Moments(), threading.Event()
    threads: list[threading.Thread] = []
    try:
        with RuntimeKubelet(api, namespace, ZERO_NAME, logs, cp.env(), tag=tag, max_pods=1) as kubelet:

            def listed() -> bool:
                with urllib.request.urlopen(f"{gateway.url}/v1/models", timeout=5) as r:
                    return any(m["id"] == ZERO_SERVED for m in json.load(r)["data"])

            wait_for(listed, timeout=60, what="the model at zero in the gateway's /v1/models")
            threads = start_watches(cp, namespace, moments, stop)
            text = stream_once(gateway.url, moments)
            (pod,) = kubelet.live()
            if pod.started_at is not None:
                moments.first("runtime_started", pod.started_at)
            assert pod.log_path is not None
            runtime_log_moments(pod.log_path, moments)
    finally:
        stop.set()
        gateway.stop()
        api.close()
    access = gateway_log_moments(logs / "gateway.log", moments)
    for t in threads:
        t.join(timeout=10)
    return {"answer": text, **split(moments), "gateway_access_line": access}

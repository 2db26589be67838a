"""A timeline of one LLMDeployment and its Deployment, polled in a thread: what the test asserts about history
(e.g. that replicas never dropped while a replica had no metrics) needs every state, not just the last one."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

GROUP, VERSION, PLURAL = "kubellm.io", "v1alpha1", "llmdeployments"


@dataclass(frozen=True)
class Snapshot:
    at: float  # time.monotonic()
    spec_replicas: int | None  # LLMDeployment spec.replicas (what the autoscaler sets)
    desired_replicas: int | None  # status.desiredReplicas
    deployment_replicas: int | None  # the Deployment's spec.replicas
    status: dict[str, Any]

    @property
    def metrics(self) -> dict[str, Any]:
        return dict(self.status.get("metrics") or {})

    @property
    def decisions(self) -> list[dict[str, Any]]:
        return list(self.status.get("scalingDecisions") or [])


class Observer:
    def __init__(self, api: Any, namespace: str, name: str, interval: float = 0.25) -> None:
        from kubernetes import client

        self.custom: Any = client.CustomObjectsApi(api)
        self.apps: Any = client.AppsV1Api(api)
        self.namespace, self.name, self.interval = namespace, name, interval
        self.timeline: list[Snapshot] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="observer", daemon=True)

    def __enter__(self) -> Observer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def latest(self) -> Snapshot | None:
        return self.timeline[-1] if self.timeline else None

    def since(self, t: float) -> list[Snapshot]:
        return [s for s in self.timeline if s.at >= t]

    def snapshot(self) -> Snapshot:
        from kubernetes.client.exceptions import ApiException

        obj = self.custom.get_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, self.name)
        try:
            dep = self.apps.read_namespaced_deployment(self.name, self.namespace)
            dep_replicas = dep.spec.replicas
        except ApiException as exc:
            if exc.status != 404:
                raise
            dep_replicas = None
        status = dict(obj.get("status") or {})
        return Snapshot(
            at=time.monotonic(),
            spec_replicas=(obj.get("spec") or {}).get("replicas"),
            desired_replicas=status.get("desiredReplicas"),
            deployment_replicas=dep_replicas,
            status=status,
        )

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.timeline.append(self.snapshot())
            except Exception as exc:  # e.g. not created yet; the test's waits report what they miss
                self.errors.append(f"{type(exc).__name__}: {exc}")
            self._stop.wait(self.interval)

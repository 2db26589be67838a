"""One LLMDeployment run end to end, the set-up the autoscaling e2e tests share: the object created, a
RuntimeKubelet running real runtimes for its pods, an Observer of its status, and a wait that fails at once when a
runtime dies and reports the last snapshot, the kubelet and the operator when it times out."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from e2e.kubelet import PodRuntime, RuntimeKubelet
from e2e.observer import GROUP, PLURAL, VERSION, Observer, Snapshot
from e2e.operator_process import OperatorProcess
from e2e.procs import marked_processes, wait_for


@dataclass
class LoopRun:
    api: Any
    namespace: str
    name: str
    kubelet: RuntimeKubelet
    observer: Observer
    operator: OperatorProcess

    def wait(self, predicate: Callable[[], Any], timeout: float, what: str) -> Any:
        def checked() -> Any:
            self.kubelet.check()  # a runtime that died on its own fails the wait at once
            return predicate()

        try:
            return wait_for(checked, timeout=timeout, what=what, interval=0.25)
        except AssertionError as exc:
            raise AssertionError(
                f"{exc}\nlast snapshot: {self.observer.latest()}\n--- kubelet\n{self.kubelet.report()}\n"
                f"--- operator\n{self.operator.log_tail()}"
            ) from None

    def latest(self) -> Snapshot:
        snap = self.observer.latest()
        assert snap is not None, f"no snapshot of the LLMDeployment yet: {self.observer.errors[-3:]}"
        return snap

    def events(self, reason: str) -> list[Any]:
        """The LLMDeployment's Events of this reason."""
        from kubernetes import client

        core: Any = client.CoreV1Api(self.api)
        items = core.list_namespaced_event(self.namespace, field_selector=f"involvedObject.name={self.name}").items
        return [e for e in items if e.involved_object.kind == "LLMDeployment" and e.reason == reason]


def served_name(pod: PodRuntime) -> str:
    """The model name the runtime serves (from the mounted config file, i.e. the operator's ConfigMap)."""
    with urllib.request.urlopen(pod.url("/v1/models"), timeout=10) as response:
        return str(json.load(response)["data"][0]["id"])


@contextmanager
def loop_run(
    k8s_cluster: Any,
    namespace: str,
    name: str,
    spec: dict[str, Any],
    operator: OperatorProcess,
    tmp_path: Path,
    *,
    tag: str,
    max_pods: int,
) -> Iterator[LoopRun]:
    """Create the LLMDeployment and run its pods' runtimes; on a clean exit every runtime has exited."""
    from kubernetes import client

    api = k8s_cluster.api_client()
    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "LLMDeployment", "metadata": {"name": name}, "spec": spec}
    client.CustomObjectsApi(api).create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)
    kubelet = RuntimeKubelet(api, namespace, name, tmp_path, k8s_cluster.env(), tag=tag, max_pods=max_pods)
    observer = Observer(api, namespace, name)
    try:
        with kubelet, observer:
            yield LoopRun(api, namespace, name, kubelet, observer, operator)
        assert kubelet.all_exited(), kubelet.report()
        assert marked_processes(tag) == [], "runtime processes outlived the test"
    finally:
        api.close()

"""The gateway end-to-end harness, shared by the gateway's k8s tests: a real `kubellm gateway` process, the operator
(the e2e fixture), and a RuntimeKubelet per LLMDeployment running its pods' real `kubellm serve` on loopback IPs."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from .gateway_process import GatewayProcess
from .kubelet import RuntimeKubelet
from .observer import GROUP, PLURAL, VERSION
from .operator_process import OperatorProcess
from .procs import marked_processes, wait_for


def llmd_spec(served_name: str, replicas: int = 1, **extra: Any) -> dict[str, Any]:
    """SmolLM2 on the CPU, two sequences at a time, a small KV cache."""
    return {
        "model": {"source": "builtin:smollm2-135m-instruct", "maxModelLen": 512, "servedModelName": served_name},
        "replicas": replicas,
        "resources": {"gpus": 0},
        "engine": {
            "maxNumSeqs": 2,
            "maxNumBatchedTokens": 256,
            "extraArgs": ["--device", "cpu", "--kv-cache-memory", str(64 * 1024 * 1024)],
        },
        **extra,
    }


def create_llmd(api: Any, namespace: str, name: str, spec: dict[str, Any]) -> None:
    from kubernetes import client

    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "LLMDeployment", "metadata": {"name": name}, "spec": spec}
    client.CustomObjectsApi(api).create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)


def get_llmd(api: Any, namespace: str, name: str) -> dict[str, Any]:
    from kubernetes import client

    obj: dict[str, Any] = client.CustomObjectsApi(api).get_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, name
    )
    return obj


def served_models(gateway: GatewayProcess) -> dict[str, dict[str, Any]]:
    with urllib.request.urlopen(f"{gateway.url}/v1/models", timeout=5) as r:
        return {m["id"]: m for m in json.load(r)["data"]}


def runtime_successes(url: str) -> float:
    """vllm:request_success_total of one runtime (every finish reason), from its /metrics at `url`."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=5) as r:
        text = r.read().decode()
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "vllm:request_success_total"
    )


class Harness:
    """The pieces of one test, with a wait that reports all their logs when it times out."""

    def __init__(self, gateway: GatewayProcess, operator: OperatorProcess, kubelets: list[RuntimeKubelet]) -> None:
        self.gateway, self.operator, self.kubelets = gateway, operator, kubelets

    def wait(self, predicate: Callable[[], Any], timeout: float, what: str) -> Any:
        def checked() -> Any:
            for kubelet in self.kubelets:
                kubelet.check()
            return predicate()

        try:
            return wait_for(checked, timeout=timeout, what=what, interval=0.2)
        except AssertionError as exc:
            reports = "\n".join(k.report() for k in self.kubelets)
            raise AssertionError(
                f"{exc}\n--- gateway\n{self.gateway.log_tail()}\n--- kubelets\n{reports}\n"
                f"--- operator\n{self.operator.log_tail()}"
            ) from None


@contextmanager
def harness(
    k8s_cluster: Any,
    namespace: str,
    run_tag: str,
    operator: OperatorProcess,
    tmp_path: Path,
    instances: list[str],
    *gateway_args: str,
    gateway_port: int | None = None,
) -> Iterator[tuple[Harness, Any]]:
    api = k8s_cluster.api_client()
    env = {**k8s_cluster.env(), "KUBELLM_E2E_RUN": f"{run_tag}-gateway"}
    gateway = GatewayProcess(namespace, env, tmp_path / "gateway.log", *gateway_args, port=gateway_port)
    kubelets = [
        RuntimeKubelet(api, namespace, name, tmp_path, k8s_cluster.env(), tag=f"{run_tag}-runtime", max_pods=2)
        for name in instances
    ]
    with ExitStack() as stack:
        for kubelet in kubelets:
            stack.enter_context(kubelet)
        stack.callback(gateway.stop)
        gateway.start()
        yield Harness(gateway, operator, kubelets), api
    api.close()
    assert marked_processes(f"{run_tag}-gateway") == [], "the gateway outlived the test"

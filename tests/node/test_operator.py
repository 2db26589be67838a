"""The operator image built from Dockerfile.runtime's `operator` target, installed with `helm install` of
charts/kubellm, runs under the real kubelet in a restricted namespace (non-root, read-only root filesystem), talks
to the API server from inside the cluster (the `kubernetes` Service through kube-proxy, its service account's
token) and reconciles: the quick start's LLMDeployment (examples/smollm2-cpu.yaml) gets its Deployment. Deleting
the operator pod ends it on SIGTERM, well within its grace period; `helm uninstall` removes it."""

from __future__ import annotations

import json
import time

import pytest
from cluster import images
from cluster.controlplane import wait_until
from cluster.provision import REPO_ROOT
from deploy.helmchart import CHART, Helm

from node.harness import NodeCluster

pytestmark = [pytest.mark.k8s, pytest.mark.node, pytest.mark.slow]

RELEASE = "kubellm"
EXAMPLE = REPO_ROOT / "examples" / "smollm2-cpu.yaml"


def _operator_pod(cp: object, namespace: str) -> dict:
    pods = json.loads(
        cp.kubectl("get", "pods", "-n", namespace, "-l", "app.kubernetes.io/name=kubellm", "-o", "json").stdout  # type: ignore[attr-defined]
    )["items"]
    assert len(pods) == 1, [p["metadata"]["name"] for p in pods]
    return pods[0]


def test_the_operator_image_reconciles_in_cluster(bare_node_cluster: NodeCluster, operator_image: images.Image) -> None:
    cp, node = bare_node_cluster.control_plane, bare_node_cluster.node
    assert cp.helm is not None, "the provisioned binaries include no helm"
    helm = Helm(cp.helm)
    node.load_image(operator_image.archive)
    repository, tag = operator_image.name.rsplit(":", 1)
    with cp.namespace("kubellm-system-") as system, cp.namespace("models-") as models:
        start = time.monotonic()
        helm.run(
            "install", RELEASE, str(CHART), "--namespace", system, "--kubeconfig", str(cp.kubeconfig),
            "--set", f"image.repository={repository}", "--set", f"image.tag={tag}", "--set", "image.pullPolicy=Never",
            "--wait", "--timeout=180s",
        )  # fmt: skip
        pod = _operator_pod(cp, system)
        print(f"helm install --wait: operator pod Ready {time.monotonic() - start:.1f} s")
        assert pod["spec"]["nodeName"] == node.name
        status = pod["status"]["containerStatuses"][0]
        assert status["ready"] and status["restartCount"] == 0, status

        cp.kubectl("apply", "-n", models, "-f", str(EXAMPLE))
        deployment = _wait_logging_operator(
            cp,
            system,
            lambda: wait_until(
                lambda: json.loads(
                    cp.kubectl("get", "deployment/smollm2", "-n", models, "-o", "json", check=False).stdout or "null"
                ),
                timeout=120,
                what="the operator (in-cluster) to create the LLMDeployment's Deployment",
            ),
        )
        owner = deployment["metadata"]["ownerReferences"][0]
        assert (owner["kind"], owner["name"]) == ("LLMDeployment", "smollm2")
        cp.kubectl("delete", "-n", models, "-f", str(EXAMPLE), "--wait=true", "--timeout=60s", timeout=70)

        # SIGTERM reaches kopf as PID 1: the pod is gone long before its 30 s grace period would have killed it.
        name = pod["metadata"]["name"]
        start = time.monotonic()
        cp.kubectl("delete", "pod", name, "-n", system, "--wait=true", "--timeout=60s", timeout=70)
        stopped_s = time.monotonic() - start
        print(f"operator pod deleted in {stopped_s:.1f} s")
        assert stopped_s < 25, f"the operator pod took {stopped_s:.1f} s to stop: SIGTERM was not handled"
        helm.run("uninstall", RELEASE, "--namespace", system, "--kubeconfig", str(cp.kubeconfig), "--wait")


def _wait_logging_operator(cp: object, namespace: str, wait: object) -> dict:
    """wait(), failing with the operator pod's log when it times out."""
    try:
        return wait()  # type: ignore[operator,no-any-return]
    except TimeoutError as exc:
        log = cp.kubectl("logs", "-n", namespace, "-l", "app.kubernetes.io/name=kubellm", "--tail=60", check=False)  # type: ignore[attr-defined]
        raise AssertionError(f"{exc}\noperator log:\n{log.stdout}{log.stderr}") from None

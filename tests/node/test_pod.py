"""A pod from an image built here (mmdebstrap base -> buildah -> containerd) under the real kubelet, in a namespace
enforcing Pod Security `restricted`: it becomes Ready through its readiness probe, its liveness probe runs, it
answers on its pod IP (routed from the host) and through a Service (kube-proxy's rules in the node), and deleting
it ends its container (SIGTERM handled as PID 1, within a short grace period)."""

from __future__ import annotations

import json
import time
import urllib.request

import pytest
from cluster import images
from cluster.controlplane import wait_until

from node import manifests
from node.harness import NodeCluster

pytestmark = [pytest.mark.k8s, pytest.mark.node, pytest.mark.slow]


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=2) as response:
        return response.read().decode()


def test_a_restricted_pod_runs_under_the_real_kubelet(node_cluster: NodeCluster, probe_image: images.Image) -> None:
    cp, node = node_cluster.control_plane, node_cluster.node
    node.load_image(probe_image.archive)
    with cp.namespace("node-pod-") as ns:
        objects = [
            manifests.pod("probe", probe_image.name, port=8080, probes=True),
            manifests.service("probe", 80, 8080),
        ]
        start = time.monotonic()
        cp.kubectl(
            "apply", "-n", ns, "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": objects})
        )
        cp.kubectl("wait", "-n", ns, "--for=condition=Ready", "pod/probe", "--timeout=120s", timeout=130)
        print(f"pod Ready {time.monotonic() - start:.1f} s after apply")
        pod = json.loads(cp.kubectl("get", "-n", ns, "pod/probe", "-o", "json").stdout)
        assert pod["spec"]["nodeName"] == node.name
        pod_ip = pod["status"]["podIP"]
        assert pod_ip.startswith(node.network.pod_cidr.rsplit(".", 2)[0]), (pod_ip, node.network.pod_cidr)

        assert _get(f"http://{pod_ip}:8080/") == "ok\n"  # the host's one route to the pod subnet
        cluster_ip = json.loads(cp.kubectl("get", "-n", ns, "service/probe", "-o", "json").stdout)["spec"]["clusterIP"]
        fetch = (
            f"import urllib.request; print(urllib.request.urlopen('http://{cluster_ip}/', timeout=2).read().decode())"
        )
        assert wait_until(
            lambda: node.in_node("python3", "-c", fetch, check=False).stdout.strip() == "ok",
            timeout=30,
            what="the Service to answer through kube-proxy",
        )

        # The kubelet's probes reached the server (its log via the apiserver -> kubelet -> containerd).
        def probed() -> bool:
            log = cp.kubectl("logs", "-n", ns, "pod/probe").stdout
            return "GET /ready kube-probe/" in log and "GET /healthz kube-probe/" in log

        wait_until(probed, timeout=30, what="readiness and liveness probes in the pod's log")
        restarts = pod["status"]["containerStatuses"][0]["restartCount"]
        assert restarts == 0

        cp.kubectl("delete", "-n", ns, "pod/probe", "--wait=true", "--timeout=60s", timeout=70)
        wait_until(lambda: _unreachable(f"http://{pod_ip}:8080/"), timeout=30, what="the deleted pod to stop serving")


def _unreachable(url: str) -> bool:
    try:
        _get(url)
    except OSError:
        return True
    return False

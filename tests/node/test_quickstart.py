"""The quick start for real (issue #15): hack/quickstart.sh, the script hack/kind-up.sh runs after creating its
cluster, run against the real node with its two hooks (build: Dockerfile.runtime's CPU runtime and operator targets
with buildah; load: import into the node's containerd, tagged as the example and the chart name them). Then, beyond
the script: the official `openai` client streams through the Service's ClusterIP (real kube-proxy, from inside the
node's network namespace) and through `kubectl port-forward`; `kubectl scale llmd` gives two Ready real pods whose
IPs the in-cluster autoscaler scrapes; `kubectl delete llmd` removes everything; `helm uninstall`.

The example is applied as written but for two lines that fit it to this 2-CPU node: cpu 500m (its 2 CPUs per
replica would leave the second replica Pending) and autoscaling in `external` mode (the operator scrapes and reports
metrics, and leaves spec.replicas to `kubectl scale`)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from cluster import images
from cluster.controlplane import ControlPlane, wait_until
from cluster.provision import REPO_ROOT

from node import manifests, openai_stream
from node.harness import NodeCluster

pytestmark = [pytest.mark.k8s, pytest.mark.node, pytest.mark.slow]

SCRIPT = REPO_ROOT / "hack" / "quickstart.sh"
EXAMPLE = REPO_ROOT / "examples" / "smollm2-cpu.yaml"
NAME = "smollm2"
PORT = 8000


def _example_for_this_node(folder: Path) -> Path:
    doc = yaml.safe_load(EXAMPLE.read_text())
    doc["spec"]["resources"]["cpu"] = "500m"
    doc["spec"]["autoscaling"] = {"enabled": True, "mode": "external", "evaluationPeriodSeconds": 2}
    path = folder / EXAMPLE.name
    path.write_text(yaml.safe_dump(doc))
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run_quickstart(cp: ControlPlane, cluster: NodeCluster, system: str, models: str, example: Path) -> str:
    assert cp.helm is not None, "the provisioned binaries include no helm"
    images_cli = f"PYTHONPATH={REPO_ROOT / 'tests'} {sys.executable} -m cluster image"
    env = {
        **os.environ,
        "PATH": os.pathsep.join([str(cp.binaries.kubectl.parent), str(cp.helm.parent), os.environ["PATH"]]),
        "KUBECONFIG": str(cp.kubeconfig),
        "KUBELLM_NAMESPACE": system,
        "DEMO_NAMESPACE": models,
        "LOCAL_PORT": str(_free_port()),
        "EXAMPLE": str(example),
        "READY_TIMEOUT": "5m",
        # The hooks: the images are the fixtures' (already built: these find them cached), loaded into the node.
        "BUILD_IMAGES": f"{images_cli} operator runtime-cpu",
        "LOAD_IMAGES": (
            f'{images_cli} --load --node-dir {cluster.node.state_dir} operator="$OPERATOR_IMAGE"'
            ' runtime-cpu="$RUNTIME_IMAGE"'
        ),
    }
    result = subprocess.run([str(SCRIPT)], env=env, capture_output=True, text=True, timeout=900, check=False)
    if result.returncode != 0:
        pods = cp.kubectl("get", "pods", "-A", "-o", "wide", check=False).stdout
        events = cp.kubectl("get", "events", "-n", models, check=False).stdout
        raise AssertionError(f"{SCRIPT.name} failed:\n{result.stderr[-6000:]}\n{result.stdout}\n{pods}\n{events}")
    print(result.stderr)
    return result.stdout


def _get(cp: ControlPlane, namespace: str, *what: str) -> Any:
    return json.loads(cp.kubectl("get", *what, "-n", namespace, "-o", "json").stdout)


def _runtime_pods(cp: ControlPlane, namespace: str) -> list[dict[str, Any]]:
    selector = f"app.kubernetes.io/instance={NAME}"
    return list(_get(cp, namespace, "pods", "-l", selector)["items"])


def _ready(pod: dict[str, Any]) -> bool:
    conditions = pod.get("status", {}).get("conditions", [])
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def _seconds_to_ready(pod: dict[str, Any]) -> float:
    ready = next(c for c in pod["status"]["conditions"] if c["type"] == "Ready")
    created = datetime.fromisoformat(pod["metadata"]["creationTimestamp"])
    return (datetime.fromisoformat(ready["lastTransitionTime"]) - created).total_seconds()


@contextlib.contextmanager
def _port_forward(cp: ControlPlane, namespace: str) -> Iterator[str]:
    port = _free_port()
    argv = [str(cp.binaries.kubectl), f"--kubeconfig={cp.kubeconfig}", "-n", namespace, "port-forward"]
    forward = subprocess.Popen([*argv, f"service/{NAME}", f"{port}:{PORT}"], stdout=subprocess.PIPE, text=True)
    try:
        assert forward.stdout is not None
        line = forward.stdout.readline()  # "Forwarding from 127.0.0.1:<port> -> 8000" once it listens
        assert "Forwarding from" in line, line
        yield f"http://127.0.0.1:{port}"
    finally:
        forward.terminate()
        forward.wait(timeout=10)


def test_the_quick_start_serves_scales_and_cleans_up(
    bare_node_cluster: NodeCluster,
    operator_image: images.Image,
    runtime_cpu_image: images.Image,
    tmp_path: Path,
) -> None:
    cp, node = bare_node_cluster.control_plane, bare_node_cluster.node
    with cp.namespace("kubellm-system-") as system, cp.namespace("models-") as models:
        start = time.monotonic()
        out = _run_quickstart(cp, bare_node_cluster, system, models, _example_for_this_node(tmp_path))
        print(f"quickstart.sh (cached images: load, install, apply, Ready, stream): {time.monotonic() - start:.1f} s")
        assert "data: [DONE]" in out and '"delta"' in out, out

        (pod,) = _runtime_pods(cp, models)
        assert pod["spec"]["nodeName"] == node.name and _ready(pod)
        container = pod["spec"]["containers"][0]
        assert container["image"] == yaml.safe_load(EXAMPLE.read_text())["spec"]["image"]["name"]
        print(f"runtime pod created -> Ready: {_seconds_to_ready(pod):.0f} s")
        # The image ships the C++ CPU kernels built at image build time: they, not the torch ops, must serve.
        logs = cp.kubectl("logs", pod["metadata"]["name"], "-n", models).stdout
        assert "CPU kernels: the C++ ones of cpu_ops.cpp serve" in logs, logs[-4000:]
        assert "CPU kernels unavailable" not in logs, logs[-4000:]

        # Through the Service: kube-proxy's rules live in the node's network namespace, so the client runs there.
        cluster_ip = _get(cp, models, "service", NAME)["spec"]["clusterIP"]
        script = str(Path(openai_stream.__file__))

        def stream_via_service() -> dict[str, Any] | None:
            ran = node.in_node(sys.executable, script, f"http://{cluster_ip}:{PORT}", NAME, check=False)
            return json.loads(ran.stdout) if ran.returncode == 0 else None

        via_service = wait_until(stream_via_service, timeout=60, what=f"a stream through the Service {cluster_ip}")
        print(f"through the Service {cluster_ip}: {via_service}")
        assert via_service["text"] and via_service["finish_reason"] in ("length", "stop"), via_service

        with _port_forward(cp, models) as url:
            via_forward = openai_stream.stream(url, NAME)
        print(f"through kubectl port-forward: {via_forward}")
        assert via_forward["text"] and via_forward["finish_reason"] in ("length", "stop"), via_forward

        _scale_to_two_and_scrape(cp, models)
        _delete_and_uninstall(cp, system, models)


def _scale_to_two_and_scrape(cp: ControlPlane, models: str) -> None:
    cp.kubectl("scale", "llmd", NAME, "--replicas=2", "-n", models)
    pods = wait_until(
        lambda: (p := _runtime_pods(cp, models)) and len(p) == 2 and all(map(_ready, p)) and p,
        timeout=300,
        what="two Ready runtime pods after `kubectl scale llmd --replicas=2`",
    )
    ips = {p["status"]["podIP"] for p in pods}
    assert len(ips) == 2, ips
    print(f"two replicas Ready on {sorted(ips)}; the second in {max(map(_seconds_to_ready, pods)):.0f} s")
    # The operator (in its pod) scrapes both pods' /metrics on their IPs; status.metrics reports what it scraped.
    metrics = wait_until(
        lambda: (m := _get(cp, models, "llmd", NAME).get("status", {}).get("metrics")) and m["podsScraped"] == 2 and m,
        timeout=120,
        what="status.metrics to show two scraped pods",
    )
    assert metrics["podsFailed"] == 0, metrics


def _delete_and_uninstall(cp: ControlPlane, system: str, models: str) -> None:
    grace_s = _runtime_pods(cp, models)[0]["spec"]["terminationGracePeriodSeconds"]
    start = time.monotonic()
    cp.kubectl("delete", "llmd", NAME, "-n", models, "--wait=true", "--timeout=120s", timeout=130)
    selector = f"app.kubernetes.io/instance={NAME}"
    kinds = "deployments,services,configmaps,poddisruptionbudgets,pods"
    wait_until(
        lambda: not json.loads(cp.kubectl("get", kinds, "-n", models, "-l", selector, "-o", "json").stdout)["items"],
        timeout=120,
        what="the LLMDeployment's objects and pods to be gone",
    )
    gone_s = time.monotonic() - start
    print(f"kubectl delete llmd -> everything gone: {gone_s:.1f} s (grace period {grace_s} s)")
    # preStop's pause, then SIGTERM to `kubellm serve` as PID 1: it drains (nothing in flight) and exits at once;
    # a runtime deaf to SIGTERM would hold its pods for the whole grace period.
    assert gone_s < grace_s, f"the runtime pods took {gone_s:.1f} s to go: SIGTERM was not handled"
    assert cp.helm is not None
    helm = [str(cp.helm), "--kubeconfig", str(cp.kubeconfig), "--namespace", system]
    subprocess.run([*helm, "uninstall", "kubellm", "--wait"], check=True, capture_output=True, timeout=120)
    wait_until(
        lambda: not _get(cp, system, "pods")["items"], timeout=60, what="the operator pod to be gone after uninstall"
    )


# As OpenShift runs pods: a UID the image has never heard of, in group 0, on a read-only root filesystem.
ARBITRARY_UID = 1000680000
KERNEL_CHECK = """
import logging, os
logging.basicConfig(level=logging.INFO)
from kubellm.runtime.kernels import cpu
assert cpu.load() is not None, "the C++ CPU kernels did not load"
print("uid", os.getuid(), "gid", os.getgid(), flush=True)
"""


def test_the_cpu_image_loads_its_kernels_as_an_arbitrary_uid_in_group_0(
    bare_node_cluster: NodeCluster, runtime_cpu_image: images.Image
) -> None:
    cp, node = bare_node_cluster.control_plane, bare_node_cluster.node
    start = time.monotonic()
    node.load_image(runtime_cpu_image.archive, runtime_cpu_image.name)  # there already after the quick start
    print(f"runtime image imported into the node's containerd in {time.monotonic() - start:.1f} s")
    pod = manifests.pod("kernels", runtime_cpu_image.name, grace_s=1)
    pod["spec"]["restartPolicy"] = "Never"
    pod["spec"]["securityContext"] |= {"runAsUser": ARBITRARY_UID, "runAsGroup": 0}
    pod["spec"]["volumes"] = [{"name": "tmp", "emptyDir": {}}]
    container = pod["spec"]["containers"][0]
    container |= {
        "command": ["python3", "-c", KERNEL_CHECK],
        "env": [{"name": "HOME", "value": "/tmp"}],  # as the operator sets it: the root filesystem is read-only
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
    }
    with cp.namespace("kernels-") as ns:
        cp.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(pod))
        phase = wait_until(
            lambda: (p := _get(cp, ns, "pod/kernels")["status"].get("phase")) in ("Succeeded", "Failed") and p,
            timeout=180,
            what="the kernel check pod to finish",
        )
        logs = cp.kubectl("logs", "-n", ns, "pod/kernels").stdout
        assert phase == "Succeeded", logs
        assert f"uid {ARBITRARY_UID} gid 0" in logs, logs
        assert "CPU kernels: the C++ ones of cpu_ops.cpp serve" in logs, logs

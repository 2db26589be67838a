"""PURE: the pods and Services the node tests create, restricted-Pod-Security compliant and pinned to the real
node (pullPolicy Never: images are imported into its containerd, there is no registry)."""

from __future__ import annotations

from typing import Any

RESTRICTED_CONTAINER = {
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "runAsNonRoot": True,
    "seccompProfile": {"type": "RuntimeDefault"},
    "readOnlyRootFilesystem": True,
}


def pod(name: str, image: str, *, port: int | None = None, probes: bool = False, grace_s: int = 5) -> dict[str, Any]:
    container: dict[str, Any] = {
        "name": "main",
        "image": image,
        "imagePullPolicy": "Never",
        "securityContext": RESTRICTED_CONTAINER,
    }
    if port is not None:
        container["ports"] = [{"name": "http", "containerPort": port}]
    if probes:
        container["readinessProbe"] = {"httpGet": {"path": "/ready", "port": "http"}, "periodSeconds": 1}
        container["livenessProbe"] = {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 1}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {
            "nodeSelector": {"kubellm.io/real-node": "true"},
            "terminationGracePeriodSeconds": grace_s,
            "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [container],
        },
    }


def service(name: str, port: int, target_port: int) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name},
        "spec": {"selector": {"app": name}, "ports": [{"port": port, "targetPort": target_port}]},
    }

"""The operator's in-cluster login names the API server by the `kubernetes` Service's address from the pod's
environment (kopf's own default, https://kubernetes.default.svc, needs cluster DNS)."""

from __future__ import annotations

from kubellm.operator.apply import in_cluster_server


def test_the_service_address_from_the_environment() -> None:
    env = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "6443"}
    assert in_cluster_server(env) == "https://10.96.0.1:6443"


def test_an_ipv6_service_address_is_bracketed_and_the_port_defaults_to_443() -> None:
    assert in_cluster_server({"KUBERNETES_SERVICE_HOST": "fd00:10:96::1"}) == "https://[fd00:10:96::1]:443"


def test_outside_a_pod_there_is_none() -> None:
    assert in_cluster_server({}) is None
    assert in_cluster_server({"KUBERNETES_SERVICE_HOST": ""}) is None

"""The chart's gateway: rendered only when enabled; two replicas, a PDB, a Service, restricted pods, and RBAC that
is exactly read LLMDeployments + LLMRoutes + pods and patch LLMDeployments (the wake), proven enough by running a real
`kubellm gateway` as that ServiceAccount against the real API server."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy.helmchart import Helm, by_kind
from e2e.gateway_process import GatewayProcess
from e2e.observer import GROUP, PLURAL, VERSION
from e2e.procs import wait_for

GATEWAY = "kubellm-gateway"
RULES = [
    {"apiGroups": ["kubellm.io"], "resources": ["llmdeployments"], "verbs": ["list", "watch", "patch"]},
    {"apiGroups": ["kubellm.io"], "resources": ["llmroutes"], "verbs": ["list", "watch"]},
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "watch"]},
]


def _gateway_objects(manifests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [m for m in manifests if m["metadata"]["name"] == GATEWAY]


def test_gateway_is_off_by_default(helm: Helm) -> None:
    assert _gateway_objects(helm.render()) == []


def test_gateway_renders_deployment_service_pdb_and_least_privilege_rbac(helm: Helm) -> None:
    manifests = _gateway_objects(helm.render(set_values=["gateway.enabled=true"]))
    kinds = sorted(m["kind"] for m in manifests)
    assert kinds == [
        "ClusterRole",
        "ClusterRoleBinding",
        "Deployment",
        "PodDisruptionBudget",
        "Service",
        "ServiceAccount",
    ]
    (deployment,) = by_kind(manifests, "Deployment")
    assert deployment["spec"]["replicas"] == 2
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector["app.kubernetes.io/component"] == "gateway"
    (pdb,) = by_kind(manifests, "PodDisruptionBudget")
    (service,) = by_kind(manifests, "Service")
    assert pdb["spec"]["selector"]["matchLabels"] == selector == service["spec"]["selector"]
    pod = deployment["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == GATEWAY
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (container,) = pod["containers"]
    assert container["args"][0] == "gateway" and "--host=0.0.0.0" in container["args"]
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    (role,) = by_kind(manifests, "ClusterRole")
    assert role["rules"] == RULES
    # One replica: no budget (it would block node drains).
    one = _gateway_objects(helm.render(set_values=["gateway.enabled=true", "gateway.replicaCount=1"]))
    assert not by_kind(one, "PodDisruptionBudget")


def test_the_operator_reads_every_gateway_pods_held_requests(helm: Helm) -> None:
    """With the gateway on, the operator's KUBELLM_GATEWAY_METRICS_URLS names a headless Service over the gateway's
    pods (each resolves to its own address) on the port the gateway listens on, and its NetworkPolicy lets it in."""
    from kubellm.operator.settings import Settings

    manifests = helm.render(set_values=["gateway.enabled=true", "networkPolicy.enabled=true"], namespace="infra")
    (gateway,) = by_kind(_gateway_objects(manifests), "Deployment")
    (pods_service,) = [m for m in by_kind(manifests, "Service") if m["metadata"]["name"] == f"{GATEWAY}-pods"]
    assert pods_service["spec"]["clusterIP"] == "None"
    assert pods_service["spec"]["selector"] == gateway["spec"]["selector"]["matchLabels"]
    (operator,) = [m for m in by_kind(manifests, "Deployment") if m["metadata"]["name"] == "kubellm"]
    env = {e["name"]: e.get("value") for e in operator["spec"]["template"]["spec"]["containers"][0]["env"]}
    port = gateway["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"]
    assert pods_service["spec"]["ports"][0]["port"] == port
    expected = (f"http://{GATEWAY}-pods.infra.svc:{port}/metrics",)
    assert (
        Settings.from_env({"KUBELLM_GATEWAY_METRICS_URLS": env["KUBELLM_GATEWAY_METRICS_URLS"]}).gateway_metrics_urls
        == expected
    )
    (policy,) = [m for m in by_kind(manifests, "NetworkPolicy") if m["metadata"]["name"] == "kubellm"]
    allowed = [rule for rule in policy["spec"]["egress"] if rule.get("to") and rule["ports"][0]["port"] == port]
    assert allowed and allowed[0]["to"][0]["podSelector"]["matchLabels"] == gateway["spec"]["selector"]["matchLabels"]
    off = helm.render()
    env_off = {e["name"] for e in one_deployment(off)["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert "KUBELLM_GATEWAY_METRICS_URLS" not in env_off


def one_deployment(manifests: list[dict[str, Any]]) -> dict[str, Any]:
    (deployment,) = by_kind(manifests, "Deployment")
    return deployment


def test_namespaced_mode_gives_the_gateway_roles_in_the_watched_namespaces_only(helm: Helm) -> None:
    values = ["gateway.enabled=true", "watchNamespaces={team-a,team-b}"]
    manifests = _gateway_objects(helm.render(set_values=values))
    assert not by_kind(manifests, "ClusterRole") and not by_kind(manifests, "ClusterRoleBinding")
    roles = by_kind(manifests, "Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    assert all(r["rules"] == RULES for r in roles)
    (deployment,) = by_kind(manifests, "Deployment")
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--namespace=team-a" in args and "--namespace=team-b" in args


def test_api_keys_come_from_a_mounted_secret_and_limits_from_values(helm: Helm) -> None:
    values = ["gateway.enabled=true", "gateway.apiKeys.secretName=team-keys", "gateway.rateLimit.tokensPerMinute=9000"]
    (deployment,) = by_kind(_gateway_objects(helm.render(set_values=values)), "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert "--api-key-file=/etc/kubellm/api-keys/keys" in container["args"]
    assert "--rate-limit-tpm=9000" in container["args"] and "--rate-limit-rpm=0" in container["args"]
    # a volume, not an env var: the kubelet rewrites the file when the Secret changes
    assert pod["volumes"] == [{"name": "api-keys", "secret": {"secretName": "team-keys"}}]
    assert container["volumeMounts"] == [{"name": "api-keys", "mountPath": "/etc/kubellm/api-keys", "readOnly": True}]
    (plain,) = by_kind(_gateway_objects(helm.render(set_values=["gateway.enabled=true"])), "Deployment")
    assert "volumes" not in plain["spec"]["template"]["spec"]
    assert not [a for a in plain["spec"]["template"]["spec"]["containers"][0]["args"] if "api-key" in a]


def test_schema_rejects_bad_gateway_values(helm: Helm) -> None:
    result = helm.template(set_values=["gateway.enabled=true", "gateway.replicaCount=0"], check=False)
    assert result.returncode != 0 and "replicaCount" in result.stderr
    result = helm.template(set_values=["gateway.bogus=1"], check=False)
    assert result.returncode != 0 and "bogus" in result.stderr
    result = helm.template(set_values=["gateway.rateLimit.requestsPerMinute=-1"], check=False)
    assert result.returncode != 0 and "requestsPerMinute" in result.stderr


def _token_kubeconfig(cluster: Any, namespace: str, service_account: str, path: Path) -> Path:
    token = cluster.kubectl("create", "token", service_account, "-n", namespace, "--duration=1h").stdout.strip()
    admin = yaml.safe_load(cluster.kubeconfig.read_text())
    user = f"system:serviceaccount:{namespace}:{service_account}"
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": admin["clusters"],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": "sa", "context": {"cluster": admin["clusters"][0]["name"], "user": user}}],
        "current-context": "sa",
    }
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.k8s
def test_the_gateway_runs_as_its_service_account_and_wakes_a_model(
    helm: Helm, k8s_cluster: Any, k8s_namespace: str, tmp_path: Path
) -> None:
    """Install the gateway's objects in a restricted namespace (the Deployment's pods pass Pod Security Admission),
    then run `kubellm gateway` as its ServiceAccount: it lists and watches, and its one write, the wake, is allowed."""
    from kubernetes import client

    ns = k8s_namespace
    values = ["gateway.enabled=true", f"watchNamespaces={{{ns}}}"]
    manifests = _gateway_objects(helm.render(set_values=values, namespace=ns))
    applied = k8s_cluster.kubectl("apply", "-f", "-", input="\n---\n".join(json.dumps(m) for m in manifests))
    assert "PodSecurity" not in applied.stderr, applied.stderr  # the namespace warns on restricted violations
    user = f"system:serviceaccount:{ns}:{GATEWAY}"
    allowed = [("patch", "llmdeployments.kubellm.io"), ("list", "pods"), ("watch", "pods")]
    for verb, resource in [*allowed, ("list", "llmroutes.kubellm.io"), ("watch", "llmroutes.kubellm.io")]:
        assert k8s_cluster.kubectl("auth", "can-i", verb, resource, f"--as={user}", "-n", ns).stdout.strip() == "yes"
    refused = [("delete", "llmdeployments.kubellm.io"), ("get", "secrets"), ("patch", "pods")]
    for verb, resource in [*refused, ("patch", "llmroutes.kubellm.io")]:
        answer = k8s_cluster.kubectl("auth", "can-i", verb, resource, f"--as={user}", "-n", ns, check=False)
        assert answer.stdout.strip() == "no", (verb, resource)

    api = k8s_cluster.api_client()
    spec = {
        "model": {"source": "builtin:smollm2-135m-instruct"},
        "replicas": 0,
        "autoscaling": {"enabled": True, "minReplicas": 0, "scaleToZeroAfterSeconds": 60},
    }
    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "LLMDeployment", "metadata": {"name": "idle"}, "spec": spec}
    custom: Any = client.CustomObjectsApi(api)
    custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, body)
    kubeconfig = _token_kubeconfig(k8s_cluster, ns, GATEWAY, tmp_path / "sa.kubeconfig")
    env = {**k8s_cluster.env(), "KUBECONFIG": str(kubeconfig)}
    gateway = GatewayProcess(ns, env, tmp_path / "gateway.log", "--hold-timeout-seconds", "2")
    try:
        gateway.start()

        def listed() -> bool:
            with urllib.request.urlopen(f"{gateway.url}/v1/models", timeout=5) as r:
                return [m["id"] for m in json.load(r)["data"]] == ["idle"]

        wait_for(listed, timeout=30, what="the model in /v1/models")
        request = urllib.request.Request(
            f"{gateway.url}/v1/completions",
            data=json.dumps({"model": "idle", "prompt": "hi", "max_tokens": 2}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with pytest.raises(urllib.error.HTTPError) as unavailable:
            urllib.request.urlopen(request, timeout=30)
        assert unavailable.value.code == 503  # no operator here: nothing starts within the 2 s hold
        error = json.loads(unavailable.value.read())["error"]
        assert "idle" in error["message"] and error["code"] == "model_unavailable"
        annotations = custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "idle")["metadata"]["annotations"]
        assert "kubellm.io/wake" in annotations, gateway.log_tail()
        assert "failed" not in gateway.log_tail(), gateway.log_tail()
    finally:
        gateway.stop()
        api.close()

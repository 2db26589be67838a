"""The Helm chart, rendered by the real helm: lint, what each mode renders, the schema, the CRD copy, the dashboard."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy.helmchart import CHART, ROOT, VALUES_DIR, VALUES_FILES, Helm, by_kind, one

VALUES_IDS = ["default", *(p.stem for p in VALUES_FILES)]
VALUES_CASES: list[list[Path]] = [[], *([p] for p in VALUES_FILES)]


def _env(deployment: dict[str, Any]) -> dict[str, str]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e.get("value", "") for e in container["env"]}


@pytest.mark.parametrize("values", VALUES_CASES, ids=VALUES_IDS)
def test_helm_lint_is_clean(helm: Helm, values: list[Path]) -> None:
    args = ["lint", str(CHART), "--strict"]
    for path in values:
        args += ["--values", str(path)]
    result = helm.run(*args)
    assert "0 chart(s) failed" in result.stdout, result.stdout


def test_default_values_render_a_cluster_wide_operator(helm: Helm) -> None:
    manifests = helm.render()
    kinds = sorted(m["kind"] for m in manifests)
    assert kinds == sorted(
        [
            "NetworkPolicy",
            "ServiceAccount",
            "CustomResourceDefinition",  # LLMDeployment
            "CustomResourceDefinition",  # LLMRoute
            "ClusterRole",
            "ClusterRoleBinding",
            "Deployment",
            "ClusterKopfPeering",
        ]
    )
    deployment = one(manifests, "Deployment")
    assert deployment["metadata"]["namespace"] == "kubellm-system"
    assert deployment["spec"]["replicas"] == 1
    env = _env(deployment)
    assert env["KUBELLM_NAMESPACES"] == ""
    assert env["KUBELLM_PEERING"] == one(manifests, "ClusterKopfPeering")["metadata"]["name"]
    pod = deployment["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == one(manifests, "ServiceAccount")["metadata"]["name"]
    binding = one(manifests, "ClusterRoleBinding")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": pod["serviceAccountName"], "namespace": "kubellm-system"}
    ]
    # The probes hit the port kopf's liveness endpoint listens on.
    (container,) = pod["containers"]
    (port,) = container["ports"]
    assert container["livenessProbe"]["httpGet"]["port"] == port["name"]
    assert env["KUBELLM_LIVENESS_ENDPOINT"] == f"http://0.0.0.0:{port['containerPort']}/healthz"


def test_namespaced_mode_grants_workload_access_only_in_the_watched_namespaces(helm: Helm) -> None:
    manifests = helm.render(values=[VALUES_DIR / "namespaced.yaml"])
    roles = by_kind(manifests, "Role")
    bindings = by_kind(manifests, "RoleBinding")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    for binding in bindings:
        assert binding["subjects"][0]["namespace"] == "kubellm-system"
    # Cluster-wide, only what is cluster-scoped by nature and read-only: no workloads, no cluster peering.
    cluster_role = one(manifests, "ClusterRole")
    resources = {r for rule in cluster_role["rules"] for r in rule["resources"]}
    assert resources == {"customresourcedefinitions", "namespaces"}
    assert {v for rule in cluster_role["rules"] for v in rule["verbs"]} == {"list", "watch"}
    assert sorted(p["metadata"]["namespace"] for p in by_kind(manifests, "KopfPeering")) == ["team-a", "team-b"]
    assert not by_kind(manifests, "ClusterKopfPeering")
    assert _env(one(manifests, "Deployment"))["KUBELLM_NAMESPACES"] == "team-a,team-b"


@pytest.mark.parametrize("values", VALUES_CASES, ids=VALUES_IDS)
def test_operator_environment_is_read_by_the_operator_settings(helm: Helm, values: list[Path]) -> None:
    """Every KUBELLM_* variable the chart sets is a Settings field, and its value passes Settings' own checks."""
    from kubellm.operator.settings import PREFIX, Settings

    env = _env(one(helm.render(values=values), "Deployment"))
    kubellm_env = {k: v for k, v in env.items() if k.startswith(PREFIX)}
    known = {PREFIX + f.upper() for f in Settings.__dataclass_fields__ if f != "extra"}
    assert set(kubellm_env) <= known, f"unknown settings: {sorted(set(kubellm_env) - known)}"
    settings = Settings.from_env(kubellm_env)
    assert settings.runtime_image == kubellm_env["KUBELLM_RUNTIME_IMAGE"]
    assert "POD_ID" in env  # kopf's peering identity


def test_ha_values_render_a_disruption_budget_and_peering(helm: Helm) -> None:
    manifests = helm.render(values=[VALUES_DIR / "ha.yaml"])
    deployment = one(manifests, "Deployment")
    assert deployment["spec"]["replicas"] == 2
    pdb = one(manifests, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    assert _env(deployment)["KUBELLM_PEERING"] == "kubellm-ha"
    assert one(manifests, "ClusterKopfPeering")["metadata"]["name"] == "kubellm-ha"
    # One replica has no budget: it would block node drains forever.
    assert not by_kind(helm.render(), "PodDisruptionBudget")


def test_pods_meet_the_restricted_pod_security_standard(helm: Helm) -> None:
    for values in VALUES_CASES:
        pod = one(helm.render(values=values), "Deployment")["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC")
        for container in pod["containers"]:
            ctx = container["securityContext"]
            assert ctx["allowPrivilegeEscalation"] is False
            assert ctx["capabilities"] == {"drop": ["ALL"]}
            assert ctx.get("privileged") is not True
        for volume in pod["volumes"]:
            assert set(volume) - {"name"} <= {"emptyDir", "configMap", "secret", "projected", "downwardAPI"}


KUBELLM_CRDS = {"llmdeployments.kubellm.io", "llmroutes.kubellm.io"}


def test_crds_switch(helm: Helm) -> None:
    crds = by_kind(helm.render(), "CustomResourceDefinition")
    assert {c["metadata"]["name"] for c in crds} == KUBELLM_CRDS  # every file of files/crds
    assert all(c["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep" for c in crds)
    for crd in by_kind(helm.render(set_values=["crds.keep=false"]), "CustomResourceDefinition"):
        assert "helm.sh/resource-policy" not in (crd["metadata"].get("annotations") or {})
    assert not by_kind(helm.render(set_values=["crds.install=false"]), "CustomResourceDefinition")
    # kopf's peering CRDs live in crds/: helm installs them first, and --include-crds shows them.
    with_crds = by_kind(helm.render(include_crds=True), "CustomResourceDefinition")
    assert {c["metadata"]["name"] for c in with_crds} == {
        *KUBELLM_CRDS,
        "kopfpeerings.kopf.dev",
        "clusterkopfpeerings.kopf.dev",
    }


def test_chart_crd_never_drifts_from_the_repository_crds() -> None:
    """charts/kubellm/files/crds/ is a byte-for-byte copy of crds/ (fix with hack/sync-chart-crds.sh)."""
    canonical = {p.name: p.read_bytes() for p in (ROOT / "crds").glob("*.yaml")}
    copied = {p.name: p.read_bytes() for p in (CHART / "files" / "crds").glob("*.yaml")}
    assert canonical, "no CRD in crds/"
    assert sorted(copied) == sorted(canonical), "run hack/sync-chart-crds.sh"
    for name, content in canonical.items():
        assert copied[name] == content, (
            f"charts/kubellm/files/crds/{name} differs from crds/{name}: run hack/sync-chart-crds.sh"
        )


def test_rendered_crd_is_the_canonical_one(helm: Helm) -> None:
    """What helm installs is each canonical CRD, plus only the chart's labels and annotations."""
    rendered = {c["metadata"]["name"]: c for c in by_kind(helm.render(), "CustomResourceDefinition")}
    for path in sorted((ROOT / "crds").glob("*.yaml")):
        canonical = yaml.safe_load(path.read_text())
        assert rendered[canonical["metadata"]["name"]]["spec"] == canonical["spec"], path.name


BAD_VALUES = [
    ("replicaCount=-1", "replicaCount"),
    ("replicaCount=two", "replicaCount"),
    ("image.pullPolicy=Sometimes", "pullPolicy"),
    ("image.repository=Not An Image", "repository"),
    ("watchNamespaces={Team_A}", "watchNamespaces"),
    ("operator.logLevel=TRACE", "logLevel"),
    ("operator.healthPort=80", "healthPort"),
    ("peering.name=Not_A_Name", "name"),
    ("serviceMonitor.interval=soon", "interval"),
    ("crds.install=maybe", "install"),
    ("resources.limits.memory=lots", "memory"),
    ("replicas=2", "replicas"),  # a typo of replicaCount: unknown keys are refused, not ignored
]


@pytest.mark.parametrize(("item", "field"), BAD_VALUES, ids=[b[0] for b in BAD_VALUES])
def test_schema_rejects_bad_values_naming_the_field(helm: Helm, item: str, field: str) -> None:
    result = helm.template(set_values=[item], check=False)
    assert result.returncode != 0, f"--set {item} was accepted"
    assert "values don't meet the specifications of the schema" in result.stderr, result.stderr
    assert field in result.stderr, result.stderr


def test_service_account_name_is_required_when_not_created(helm: Helm) -> None:
    result = helm.template(set_values=["serviceAccount.create=false"], check=False)
    assert result.returncode != 0
    assert "serviceAccount.name is required" in result.stderr


def test_service_monitor_selects_the_runtime_services_the_operator_creates(helm: Helm) -> None:
    from kubellm.operator import constants

    manifests = helm.render(values=[VALUES_DIR / "monitoring.yaml"])
    monitor = one(manifests, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert monitor["spec"]["selector"]["matchLabels"] == {
        constants.LABEL_MANAGED_BY: constants.MANAGED_BY,
        constants.LABEL_COMPONENT: constants.COMPONENT_RUNTIME,
    }
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == constants.PORT_NAME
    assert endpoint["path"] == constants.METRICS_PATH
    assert monitor["spec"]["namespaceSelector"] == {"any": True}
    namespaced = helm.render(values=[VALUES_DIR / "monitoring.yaml", VALUES_DIR / "namespaced.yaml"])
    assert one(namespaced, "ServiceMonitor")["spec"]["namespaceSelector"] == {"matchNames": ["team-a", "team-b"]}
    assert not by_kind(helm.render(), "ServiceMonitor")
    # with the gateway on, a second monitor scrapes the gateway's own Service (the same selector as the Service's)
    with_gateway = helm.render(values=[VALUES_DIR / "monitoring.yaml"], set_values=["gateway.enabled=true"])
    monitors = by_kind(with_gateway, "ServiceMonitor")
    (gateway_monitor,) = [m for m in monitors if m["metadata"]["name"].endswith("gateway")]
    (service,) = [m for m in by_kind(with_gateway, "Service") if m["metadata"]["name"].endswith("gateway")]
    assert gateway_monitor["spec"]["selector"]["matchLabels"] == service["spec"]["selector"]
    assert gateway_monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]


def _exported_metric_names() -> set[str]:
    """The sample names a runtime's /metrics really exposes, from the runtime's own metrics code."""
    from kubellm.runtime.outputs import EngineStats
    from kubellm.runtime.server.metrics import ServerMetrics

    stats = EngineStats(
        num_requests_waiting=1, num_requests_running=2, kv_cache_usage=0.5, num_gpu_blocks=64, block_size=16
    )
    metrics = ServerMetrics("m", lambda: stats)
    metrics.ttft.observe(0.1)
    metrics.generation_tokens.inc(3)
    metrics.prompt_tokens.inc(5)
    text = metrics.render().decode()
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}


def _gateway_metric_names() -> set[str]:
    """The sample names the gateway's /metrics exposes (families with no sample yet still declare their names)."""
    from prometheus_client import generate_latest

    from kubellm.gateway.metrics import GatewayMetrics

    metrics = GatewayMetrics()
    metrics.requests.labels("m", "200").inc()
    metrics.held.labels("ns", "d", "m").set(1)
    metrics.cache_requests.labels("m", "hit").inc()
    metrics.route_decisions.labels("r", "t", "matched").inc()
    metrics.added_latency.observe(0.001)
    text = generate_latest(metrics.registry).decode()
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}


def test_grafana_dashboard_plots_metrics_the_runtime_exports(helm: Helm) -> None:
    manifests = helm.render(values=[VALUES_DIR / "monitoring.yaml"])
    config_map = one(manifests, "ConfigMap")
    assert config_map["metadata"]["namespace"] == "monitoring"
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(config_map["data"]["kubellm.json"])
    titles = " | ".join(p["title"] for p in dashboard["panels"]).lower()
    for topic in ("queue depth", "kv-cache", "time to first token", "tokens per second", "replicas"):
        assert topic in titles
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    used = {name for expr in exprs for name in re.findall(r"(vllm:[a-z_]+)", expr)}
    exported = _exported_metric_names()
    assert used, exprs
    assert used <= exported, f"the dashboard queries metrics the runtime does not export: {sorted(used - exported)}"
    # the gateway's row queries what the gateway exports
    assert "Gateway" in [p["title"] for p in dashboard["panels"] if p["type"] == "row"]
    used_gateway = {name for expr in exprs for name in re.findall(r"(kubellm_gateway_[a-z_]+)", expr)}
    missing = used_gateway - _gateway_metric_names()
    assert len(used_gateway) >= 5 and not missing, f"the dashboard queries gateway metrics that do not exist: {missing}"
    assert not by_kind(helm.render(), "ConfigMap")


def test_notes_tell_the_user_what_to_do_next(helm: Helm) -> None:
    result = helm.run("install", "demo", str(CHART), "--dry-run=client", "--namespace", "llm-ops")
    notes = result.stdout.split("NOTES:", 1)[1]
    assert "kubectl -n llm-ops rollout status deployment/demo-kubellm" in notes
    assert "kind: LLMDeployment" in notes
    assert "port-forward service/smollm2" in notes
    assert "/v1/chat/completions" in notes
    namespaced = helm.run(
        "install", "demo", str(CHART), "--dry-run=client", "-n", "llm-ops", "-f", str(VALUES_DIR / "namespaced.yaml")
    ).stdout
    assert "watches LLMDeployments in: team-a, team-b" in namespaced
    assert "kubectl -n team-a apply" in namespaced


def test_no_fixed_uid_and_security_contexts_come_from_values(helm: Helm) -> None:
    """OpenShift assigns each namespace a UID range: nothing may pin a UID unless values ask for one."""
    deployment = one(helm.render(), "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert "runAsUser" not in pod["securityContext"] and "fsGroup" not in pod["securityContext"]
    custom = helm.render(
        set_values=["podSecurityContext.runAsUser=1000680000", "operator.runtimePodSecurityContext.fsGroup=2000"]
    )
    pod = one(custom, "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsUser"] == 1000680000
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert json.loads(env["KUBELLM_RUNTIME_POD_SECURITY_CONTEXT"]) == {"fsGroup": 2000}


def test_network_policy_lets_the_operator_reach_the_api_server_and_scrape(helm: Helm) -> None:
    (policy,) = by_kind(helm.render(), "NetworkPolicy")
    selector = one(helm.render(), "Deployment")["spec"]["selector"]["matchLabels"]
    assert policy["spec"]["podSelector"]["matchLabels"] == selector
    egress = policy["spec"]["egress"]
    scrape = [rule for rule in egress if rule.get("to")]
    assert scrape[0]["ports"] == [{"port": 8000, "protocol": "TCP"}]
    assert scrape[0]["to"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "runtime"
    assert {p["port"] for rule in egress for p in rule["ports"]} >= {443, 6443, 53, 8000}
    namespaced = helm.render(
        values=[VALUES_DIR / "namespaced.yaml"],
        set_values=["watchNamespaces={a,b}", "networkPolicy.allowScrapesInWatchedNamespaces=true"],
    )
    scrapes = [p for p in by_kind(namespaced, "NetworkPolicy") if p["metadata"]["name"].endswith("-scrape")]
    assert sorted(p["metadata"]["namespace"] for p in scrapes) == ["a", "b"]


def test_kube_version_is_the_tested_one() -> None:
    """The chart claims exactly what the test control plane runs (tests/cluster/provision.py)."""
    from cluster.provision import KUBERNETES_VERSION

    chart = yaml.safe_load((ROOT / "charts" / "kubellm" / "Chart.yaml").read_text())
    major_minor = ".".join(KUBERNETES_VERSION.lstrip("v").split(".")[:2])
    assert chart["kubeVersion"] == f">={major_minor}.0-0"

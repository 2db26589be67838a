"""examples/: every LLMDeployment is a valid spec, every reference inside a file resolves, and together they cover
what the README promises (CPU demo, one GPU with a PVC cache, several GPUs, builtin and KEDA autoscaling).
The API server's verdict (dry run) and the operator's reconciliation are in test_k8s_deploy.py.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy.helmchart import CHART, ROOT

EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _llmds(path: Path) -> list[dict[str, Any]]:
    return [d for d in _docs(path) if d["kind"] == "LLMDeployment"]


def test_examples_exist() -> None:
    assert len(EXAMPLES) >= 5, EXAMPLES


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_every_llmdeployment_is_a_valid_spec(path: Path) -> None:
    from kubellm.operator import constants
    from kubellm.operator.spec import check_name, parse_spec

    llmds = _llmds(path)
    assert llmds, f"{path.name} holds no LLMDeployment"
    for doc in _docs(path):
        assert "namespace" not in doc["metadata"], "examples apply to the namespace the user picks (-n)"
    for llmd in llmds:
        assert llmd["apiVersion"] == constants.API_VERSION
        check_name(llmd["metadata"]["name"], parse_spec(llmd["spec"]))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_references_inside_an_example_resolve(path: Path) -> None:
    """A PVC or Secret an LLMDeployment names is created by the same file or by a command its header gives."""
    docs = _docs(path)
    header = path.read_text().split("apiVersion:", 1)[0]
    claims = {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"}
    for llmd in _llmds(path):
        spec = llmd["spec"]
        pvc = spec.get("storage", {}).get("persistentVolumeClaim", {}).get("claimName")
        if pvc:
            assert pvc in claims, f"claim {pvc} is not in {path.name}"
        source = spec["model"]["source"]
        if source.startswith("pvc://"):
            assert source.split("/")[2] in claims
        secret = spec["model"].get("tokenSecretRef", {}).get("name")
        if secret:
            assert f"kubectl create secret generic {secret}" in header, f"{path.name} never says how to create {secret}"


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_every_llmroute_is_valid_and_its_tiers_name_llmdeployments_of_the_file(path: Path) -> None:
    from kubellm.gateway.route import parse_route
    from kubellm.operator import constants
    from kubellm.operator.route_spec import parse_route_spec

    names = {d["metadata"]["name"] for d in _llmds(path)}
    for route in (d for d in _docs(path) if d["kind"] == constants.ROUTE_KIND):
        assert route["apiVersion"] == constants.API_VERSION
        spec = parse_route_spec(route["spec"])
        assert {t.deployment for t in spec.tiers} <= names, f"{path.name}: a tier names an LLMDeployment not in it"
        assert parse_route({**route, "metadata": {**route["metadata"], "namespace": "x"}}) is not None  # the gateway's


def test_an_example_routes_by_complexity() -> None:
    from kubellm.gateway.route import features, parse_route

    (route,) = [d for d in _docs(ROOT / "examples" / "llmroute-tiers.yaml") if d["kind"] == "LLMRoute"]
    parsed = parse_route(route)
    assert parsed is not None

    def tier(text: str, **extra: object) -> str:
        chosen = parsed.choose(features("chat", {"messages": [{"role": "user", "content": text}], **extra}))
        assert chosen is not None
        return parsed.tiers[chosen].name

    assert tier("Hi, how are you?", max_tokens=100) == "small"
    assert tier("Hi, how are you?") == "large"
    assert tier("Why does this Python code fail?", max_tokens=100) == "code"
    assert tier("Hi " * 2000, max_tokens=100) == "large"


def test_the_cpu_demo_runs_the_image_kind_up_builds() -> None:
    """The demo serves the bundled model on CPUs, from the CPU image hack/kind-up.sh builds and loads into kind."""
    (demo,) = _llmds(ROOT / "examples" / "smollm2-cpu.yaml")
    spec = demo["spec"]
    assert spec["model"]["source"] == "builtin:smollm2-135m-instruct"
    assert spec["resources"]["gpus"] == 0
    app_version = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert spec["image"]["name"] == f"{values['operator']['runtimeImage']['repository']}:{app_version}-cpu"
    # The chart's NOTES show the same manifest.
    assert "source: builtin:smollm2-135m-instruct" in (CHART / "templates" / "NOTES.txt").read_text()


def test_examples_cover_the_documented_scenarios() -> None:
    specs = [llmd["spec"] for path in EXAMPLES for llmd in _llmds(path)]
    assert any(s["resources"].get("gpus") == 0 for s in specs), "a CPU demo"
    assert any(
        s["resources"].get("gpus", 1) == 1
        and s["model"]["source"].startswith("hf://")
        and "modelCache" in s.get("storage", {})
        for s in specs
    ), "one GPU, a model from Hugging Face, downloaded once into a model cache"
    assert any("persistentVolumeClaim" in s.get("storage", {}) for s in specs), "a cache claim of one's own"
    assert any(s["resources"].get("gpus", 1) > 1 for s in specs), "several GPUs per replica"
    assert any(s.get("parallelism", {}).get("nodes", 1) > 1 for s in specs), "a replica spanning nodes"
    assert any(
        s.get("autoscaling", {}).get("mode", "builtin") == "builtin" and s["autoscaling"]["enabled"]
        for s in specs
        if "autoscaling" in s
    ), "builtin autoscaling"
    assert any(s.get("autoscaling", {}).get("mode") == "external" for s in specs), "external autoscaling"


def test_keda_scaled_object_targets_the_scale_subresource_on_queue_depth() -> None:
    from kubellm.operator import constants

    path = ROOT / "examples" / "autoscaling-keda.yaml"
    docs = _docs(path)
    (scaled,) = [d for d in docs if d["kind"] == "ScaledObject"]
    (llmd,) = _llmds(path)
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    target = scaled["spec"]["scaleTargetRef"]
    # KEDA scales any resource with a scale subresource; the CRD declares one.
    assert (target["apiVersion"], target["kind"], target["name"]) == (
        constants.API_VERSION,
        constants.KIND,
        llmd["metadata"]["name"],
    )
    crd = yaml.safe_load((ROOT / "crds" / "kubellm.io_llmdeployments.yaml").read_text())
    assert all(v["subresources"]["scale"]["specReplicasPath"] == ".spec.replicas" for v in crd["spec"]["versions"])
    # spec.replicas belongs to KEDA: the operator must not autoscale too.
    auto = llmd["spec"]["autoscaling"]
    assert auto["enabled"] and auto["mode"] == "external"
    assert (scaled["spec"]["minReplicaCount"], scaled["spec"]["maxReplicaCount"]) == (
        auto["minReplicas"],
        auto["maxReplicas"],
    )
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "prometheus"
    query = trigger["metadata"]["query"]
    assert re.search(r"\bsum\(vllm:num_requests_waiting\{", query), query
    assert f'model_name="{llmd["metadata"]["name"]}"' in query  # the served name defaults to the LLMDeployment's
    assert constants.METRIC_WAITING == "vllm:num_requests_waiting"
    assert float(trigger["metadata"]["threshold"]) > 0

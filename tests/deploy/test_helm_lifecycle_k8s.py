"""The chart's whole life with the real helm binary against a real control plane (issue #17): `helm install` of an
older chart version, `helm upgrade` to this one (a values change and a CRD change), `helm uninstall`.

A control plane of its own without our CRDs (`bare_cluster`): helm installs the CRD here, and an uninstall or an old
CRD must never touch the session's cluster. The operator's pods run on kwok nodes (nothing executes the image).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from cluster import ControlPlane, wait_until
from deploy.helmchart import CHART, Helm

from kubellm.operator import constants as c

pytestmark = [pytest.mark.k8s, pytest.mark.slow]

RELEASE, NAMESPACE = "kubellm", "kubellm-system"
CRD_NAME = f"{c.PLURAL}.{c.GROUP}"
# The field the older chart's CRD does not have yet (no CEL rule of the CRD mentions it).
NEW_FIELD = "routing"


def _older_chart(tmp_path: Path) -> Path:
    """This chart as it was before spec.routing: the same templates, a CRD without the field."""
    old = tmp_path / "old" / "kubellm"
    shutil.copytree(CHART, old)
    path = old / "files" / "crds" / "kubellm.io_llmdeployments.yaml"
    crd = yaml.safe_load(path.read_text())
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    del spec["properties"][NEW_FIELD]
    path.write_text(yaml.safe_dump(crd, sort_keys=False))
    return old


def _get(cluster: ControlPlane, *args: str) -> dict[str, Any] | None:
    """One object, or None when it does not exist."""
    result = cluster.kubectl("get", *args, "-o", "json", "--ignore-not-found")
    return json.loads(result.stdout) if result.stdout.strip() else None


def _names(cluster: ControlPlane, *args: str) -> list[str]:
    """The names of the objects a list query finds."""
    items = json.loads(cluster.kubectl("get", *args, "-o", "json").stdout)["items"]
    return sorted(item["metadata"]["name"] for item in items)


def _crd_has_field(cluster: ControlPlane) -> bool:
    crd = _get(cluster, "crd", CRD_NAME)
    assert crd is not None, "the LLMDeployment CRD is not installed"
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return NEW_FIELD in schema["properties"]["spec"]["properties"]


def _apply_model(cluster: ControlPlane, name: str, namespace: str) -> dict[str, Any]:
    """An LLMDeployment that sets spec.routing; returns it as the API server stored it."""
    body = {
        "apiVersion": c.API_VERSION,
        "kind": c.KIND,
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "model": {"source": "builtin:smollm2-135m-instruct"},
            "resources": {"gpus": 0},
            NEW_FIELD: {"strategy": "LeastLoad"},
        },
    }
    cluster.kubectl("apply", "--validate=warn", "-f", "-", input=json.dumps(body))  # an unknown field: a warning
    stored = _get(cluster, c.PLURAL, name, "-n", namespace)
    assert stored is not None
    return stored


def test_install_upgrade_uninstall(bare_cluster: ControlPlane, helm: Helm, tmp_path: Path) -> None:
    cluster = bare_cluster
    env = {
        **cluster.env(),
        **{f"HELM_{kind}_HOME": str(tmp_path / "helm" / kind.lower()) for kind in ("CACHE", "CONFIG", "DATA")},
    }

    def run(*args: str) -> str:
        return helm.run(*args, "--namespace", NAMESPACE, env=env).stdout

    # 1. install the older chart: the release waits for the operator's Deployment (kwok runs its pod).
    run("install", RELEASE, str(_older_chart(tmp_path)), "--create-namespace", "--wait", "--timeout", "90s")
    assert json.loads(run("status", RELEASE, "-o", "json"))["info"]["status"] == "deployed"
    assert not _crd_has_field(cluster)
    operators = _names(cluster, "deployment", "-n", NAMESPACE, "-l", f"app.kubernetes.io/instance={RELEASE}")
    assert len(operators) == 1, operators
    deployment_name = operators[0]
    # what an older CRD does to a newer field: the API server prunes it
    assert NEW_FIELD not in _apply_model(cluster, "before", "default")["spec"]

    # 2. upgrade to this chart with a values change: the CRD gains the field, the Deployment the new value.
    run("upgrade", RELEASE, str(CHART), "--set", "operator.logLevel=DEBUG", "--wait", "--timeout", "90s")
    history = json.loads(run("history", RELEASE, "-o", "json"))
    assert [h["status"] for h in history] == ["superseded", "deployed"], history
    wait_until(lambda: _crd_has_field(cluster), timeout=30, what="the upgraded CRD to carry spec.routing")
    deployment = _get(cluster, "deployment", deployment_name, "-n", NAMESPACE)
    assert deployment is not None
    env_vars = {e["name"]: e.get("value") for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env_vars["KUBELLM_LOG_LEVEL"] == "DEBUG", env_vars
    # the field is kept now (the API server's discovery of the new schema can lag the CRD write by a moment)
    wait_until(
        lambda: (_apply_model(cluster, "after", "default")["spec"].get(NEW_FIELD) or {}).get("strategy") == "LeastLoad",
        timeout=30,
        what="spec.routing to be stored under the upgraded CRD",
    )

    # 3. uninstall: the release's objects go; the CRD stays (crds.keep), and so do the users' LLMDeployments.
    run("uninstall", RELEASE, "--wait", "--timeout", "90s")
    assert _get(cluster, "deployment", deployment_name, "-n", NAMESPACE) is None
    assert _names(cluster, "clusterrole,clusterrolebinding", "-l", f"app.kubernetes.io/instance={RELEASE}") == []
    # the operator's pods follow their ReplicaSet through the garbage collector, a moment after helm returns
    wait_until(
        lambda: _names(cluster, "all", "-n", NAMESPACE, "-l", f"app.kubernetes.io/instance={RELEASE}") == [],
        timeout=60,
        what="the release's pods and ReplicaSets to be collected",
    )
    assert _crd_has_field(cluster)
    assert _names(cluster, c.PLURAL, "-n", "default") == ["after", "before"]

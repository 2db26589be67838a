"""The CRD in crds/ is exactly what spec.py generates, and it is a structural schema whose defaults agree with
the pydantic models' defaults."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from kubellm.operator import constants
from kubellm.operator.crd import CRDS, build_crd, build_route_crd, main, render_crd
from kubellm.operator.spec import LLMDeploymentSpec

REPO_ROOT = Path(__file__).resolve().parents[2]
CRD_FILE = REPO_ROOT / "crds" / "kubellm.io_llmdeployments.yaml"
ROUTE_CRD_FILE = REPO_ROOT / "crds" / "kubellm.io_llmroutes.yaml"


def _schema(crd: dict[str, Any] | None = None) -> dict[str, Any]:
    return (crd or build_crd())["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


@pytest.mark.parametrize("kind", sorted(CRDS))
def test_committed_crd_is_the_generated_one(kind: str) -> None:
    path = CRDS[kind][1]
    assert path.parent == REPO_ROOT / "crds"
    assert path.read_text() == render_crd(kind), (
        f"crds/{path.name} is stale: regenerate it with `PYTHONSAFEPATH=1 python -m kubellm.operator.crd --write`"
    )


def test_crd_command_prints_either_kind_and_refuses_others(capsys: Any) -> None:
    assert main([]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["spec"]["names"]["kind"] == "LLMDeployment"
    assert main(["--kind", "llmroute"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["spec"]["names"]["kind"] == "LLMRoute"
    assert main(["--kind", "llmwhat"]) == 2
    assert "usage" in capsys.readouterr().err


def test_route_crd_names_and_columns() -> None:
    crd = yaml.safe_load(ROUTE_CRD_FILE.read_text())
    assert crd["metadata"]["name"] == "llmroutes.kubellm.io"
    spec = crd["spec"]
    assert (spec["group"], spec["scope"]) == ("kubellm.io", "Namespaced")
    assert spec["names"]["kind"] == "LLMRoute" and spec["names"]["shortNames"] == ["llmr"]
    (version,) = spec["versions"]
    assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
    assert "subresources" not in version  # the gateway reads routes and writes nothing back
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns == {"Model": ".spec.model", "Tiers": ".spec.tiers[*].name", "Age": ".metadata.creationTimestamp"}
    route = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert route["required"] == ["model", "tiers"]
    tiers = route["properties"]["tiers"]
    assert (tiers["minItems"], tiers["maxItems"]) == (1, 8)
    when = tiers["items"]["properties"]["when"]
    assert "default" not in when  # absent `when`: a default tier
    assert set(when["properties"]) == {
        "minPromptTokens",
        "maxPromptTokens",
        "maxRequestedTokens",
        "tools",
        "lastUserMessageRegex",
    }


def test_names_subresources_and_columns() -> None:
    crd = yaml.safe_load(CRD_FILE.read_text())
    assert crd["metadata"]["name"] == "llmdeployments.kubellm.io"
    spec = crd["spec"]
    assert (spec["group"], spec["scope"]) == ("kubellm.io", "Namespaced")
    assert spec["names"]["kind"] == "LLMDeployment"
    assert spec["names"]["shortNames"] == ["llmd"]
    (version,) = spec["versions"]
    assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
    assert version["subresources"]["status"] == {}
    assert version["subresources"]["scale"] == {
        "specReplicasPath": ".spec.replicas",
        "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.selector",
    }
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns["Model"] == ".spec.model.source"
    assert columns["Ready"] == ".status.ready"
    assert columns["Queue"] == ".status.metrics.queueDepth"
    assert columns["KV%"] == ".status.metrics.kvCachePercent"
    assert columns["Age"] == ".metadata.creationTimestamp"


def _walk(schema: dict[str, Any], path: str) -> list[tuple[str, dict[str, Any]]]:
    out = [(path, schema)]
    for name, prop in schema.get("properties", {}).items():
        out += _walk(prop, f"{path}.{name}")
    if isinstance(schema.get("additionalProperties"), dict):
        out += _walk(schema["additionalProperties"], f"{path}[*]")
    if "items" in schema:
        out += _walk(schema["items"], f"{path}[]")
    return out


@pytest.mark.parametrize("build", [build_crd, build_route_crd], ids=["llmdeployment", "llmroute"])
def test_schema_is_structural(build: Any) -> None:
    """The rules the API server enforces for structural schemas (it would refuse the CRD otherwise), checked
    here so a model change fails fast, without a cluster."""
    for path, node in _walk(_schema(build()), "root"):
        int_or_string = node.get("x-kubernetes-int-or-string")
        assert "type" in node or int_or_string, f"{path}: no type"
        assert "$ref" not in node and "allOf" not in node and "oneOf" not in node, path
        if "anyOf" in node:
            assert int_or_string and node["anyOf"] == [{"type": "integer"}, {"type": "string"}], path
        assert node.get("additionalProperties") is not False, f"{path}: additionalProperties: false"
        assert "patternProperties" not in node and "propertyNames" not in node, path
        if node.get("type") == "object" and path not in ("root.metadata",):
            assert (
                "properties" in node
                or "additionalProperties" in node
                or node.get("x-kubernetes-preserve-unknown-fields")
            ), f"{path}: an object without properties would be pruned to nothing"
        assert "title" not in node, path
        for rule in node.get("x-kubernetes-validations", []):
            assert rule["rule"] and rule["message"], path


def _apply_defaults(schema: dict[str, Any], value: Any) -> Any:
    """OpenAPI defaulting as the API server does it: fill absent properties that have a default, recursively."""
    if isinstance(value, dict) and "properties" in schema:
        out = dict(value)
        for name, prop in schema["properties"].items():
            if name not in out and "default" in prop:
                out[name] = prop["default"]
            if name in out:
                out[name] = _apply_defaults(prop, out[name])
        return out
    if isinstance(value, list) and "items" in schema:
        return [_apply_defaults(schema["items"], v) for v in value]
    return value


def test_api_server_defaults_equal_pydantic_defaults() -> None:
    """One source of truth: what the API server stores for a minimal object is what the models assume."""
    minimal = {"model": {"source": "builtin:smollm2-135m-instruct"}}
    defaulted = _apply_defaults(_schema()["properties"]["spec"], minimal)
    expected = LLMDeploymentSpec.model_validate(minimal).model_dump(by_alias=True, exclude_none=True)
    # Lists and maps that default to empty are left absent by the API server (no default: []).
    for section in expected.values():
        if isinstance(section, dict):
            for key in [k for k, v in section.items() if v in ([], {})]:
                del section[key]
    assert defaulted == expected
    # ...and the defaulted object parses to the same model.
    assert LLMDeploymentSpec.model_validate(defaulted) == LLMDeploymentSpec.model_validate(minimal)


def test_enums_and_ranges_come_from_the_models() -> None:
    spec = _schema()["properties"]["spec"]["properties"]
    assert spec["model"]["properties"]["dtype"]["enum"] == ["auto", "float16", "bfloat16", "float32"]
    assert spec["engine"]["properties"]["blockSize"]["enum"] == [8, 16, 32, 64, 128]
    gmu = spec["engine"]["properties"]["gpuMemoryUtilization"]
    assert (gmu["minimum"], gmu["exclusiveMinimum"], gmu["maximum"]) == (0.0, True, 1.0)
    assert spec["autoscaling"]["properties"]["mode"]["enum"] == ["builtin", "external"]
    rules = [r["rule"] for r in spec["autoscaling"]["x-kubernetes-validations"]]
    assert "!has(self.minReplicas) || !has(self.maxReplicas) || (self.minReplicas <= self.maxReplicas)" in rules
    assert spec["replicas"]["minimum"] == 0
    assert _schema()["properties"]["spec"]["required"] == ["model"]
    assert spec["model"]["required"] == ["source"]


def test_print_crd_command(capsys: Any) -> None:
    import argparse

    from kubellm.operator import cli

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    assert cli.run(parser.parse_args(["--print-crd"])) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["spec"]["names"]["plural"] == constants.PLURAL

"""The LLMRoute spec's pydantic twins of its CRD rules (the API server's verdict on the same objects is in
tests/gateway/test_route_k8s.py)."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from kubellm.operator.route_spec import parse_route_spec


def _spec(**tier: Any) -> dict[str, Any]:
    return {"model": "auto", "tiers": [{"name": "small", "deployment": "tiny", **tier}]}


def test_a_full_spec_parses_by_its_wire_names() -> None:
    spec = parse_route_spec(
        {
            "model": "org/auto:v1",
            "tiers": [
                {
                    "name": "small",
                    "deployment": "tiny",
                    "when": {
                        "minPromptTokens": 0,
                        "maxPromptTokens": 512,
                        "maxRequestedTokens": 256,
                        "tools": False,
                        "lastUserMessageRegex": r"(?i)\bhello\b",
                    },
                },
                {"name": "large", "deployment": "big", "description": "everything else"},
            ],
            "classifier": {"deployment": "tiny", "timeoutSeconds": 0.5},
        }
    )
    assert spec.classifier is not None and spec.classifier.timeout_seconds == 0.5
    assert [t.name for t in spec.tiers] == ["small", "large"]
    assert spec.tiers[0].when is not None and spec.tiers[0].when.max_prompt_tokens == 512
    assert spec.tiers[1].when is None


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"model": "auto", "tiers": []}, "tiers"),
        ({"model": "auto", "tiers": [{"name": f"t{i}", "deployment": "d"} for i in range(9)]}, "tiers"),
        ({"model": "auto", "tiers": [{"name": "a", "deployment": "d"}, {"name": "a", "deployment": "e"}]}, "unique"),
        (_spec(when={"minPromptTokens": 10, "maxPromptTokens": 5}), "minPromptTokens"),
        (_spec(when={"lastUserMessageRegex": "(open"}), "lastUserMessageRegex"),
        (_spec(when={"maxRequestedTokens": 0}), "maxRequestedTokens"),
        (_spec(when={"tokens": 3}), "tokens"),
        (_spec(deployment="Not_A_Name"), "deployment"),
        ({"model": " spaced", "tiers": [{"name": "a", "deployment": "d"}]}, "model"),
        ({**_spec(), "classifier": {"deployment": "tiny", "timeoutSeconds": 0}}, "timeoutSeconds"),
        ({**_spec(), "classifier": {}}, "deployment"),
    ],
)
def test_invalid_specs_are_refused_naming_the_field(spec: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError, match=field):
        parse_route_spec(spec)

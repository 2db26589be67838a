"""The LLMRoute spec as typed pydantic models: the one source of its CRD schema (crd.py generates it).

An LLMRoute defines a virtual model name over ordered tiers of LLMDeployments in its namespace. The kubellm
gateway reads it (gateway/route.py: the rules, the choice, the fallback); the operator serves nothing for it.
As in spec.py, every CEL rule has a pydantic twin so that a spec is checked the same way without an API server.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import ConfigDict, Field, model_validator

from kubellm.operator.spec import (
    DNS1035_LABEL,
    MAX_NAME_LENGTH,
    MAX_SERVED_NAME_LENGTH,
    SERVED_NAME_PATTERN,
    _Spec,
    cel,
    cel_when,
)

# A tier's name goes into a response header and a metric label: a DNS-1123 label.
TIER_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
MAX_TIERS = 8
MAX_REGEX_LENGTH = 1024
MAX_TOKENS_BOUND = 10_000_000
MAX_INSTRUCTIONS_LENGTH = 4096

# A regex the API server cannot compile makes `matches` fail to evaluate, on both sides of the `||`: the object is
# refused. (RE2 is what the API server compiles; the gateway uses Python's `re`, which reads RE2's common syntax the
# same way; a pattern only RE2 reads, such as \pL, is reported by the gateway and the route is not served.)
# The rule sits on the field itself, so the refusal names it (an evaluation error ignores fieldPath).
_REGEX_COMPILES = "''.matches(self) || !''.matches(self)"


class TierRules(_Spec):
    """When a tier serves a request: every rule given must hold (they are ANDed); none given: always."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel_when(
                    ("minPromptTokens", "maxPromptTokens"),
                    "self.minPromptTokens <= self.maxPromptTokens",
                    "minPromptTokens must be <= maxPromptTokens",
                    ".minPromptTokens",
                ),
            ]
        }
    )

    min_prompt_tokens: int | None = Field(
        default=None, ge=0, le=MAX_TOKENS_BOUND, description="The prompt has at least this many tokens (estimated)."
    )
    max_prompt_tokens: int | None = Field(
        default=None, ge=0, le=MAX_TOKENS_BOUND, description="The prompt has at most this many tokens (estimated)."
    )
    max_requested_tokens: int | None = Field(
        default=None,
        ge=1,
        le=MAX_TOKENS_BOUND,
        description="The request asks for at most this many tokens (max_tokens / max_completion_tokens; a request "
        "that sets neither does not match).",
    )
    tools: bool | None = Field(default=None, description="true: the request carries tools; false: it carries none.")
    last_user_message_regex: str | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_REGEX_LENGTH,
        description="A regular expression found (searched, not anchored) in the last user message's text "
        "(completions: the prompt).",
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(_REGEX_COMPILES, "lastUserMessageRegex must be a valid regular expression (RE2 syntax)")
            ]
        },
    )

    @model_validator(mode="after")
    def _check(self) -> TierRules:
        low, high = self.min_prompt_tokens, self.max_prompt_tokens
        if low is not None and high is not None and low > high:
            raise ValueError("minPromptTokens must be <= maxPromptTokens")
        if self.last_user_message_regex is not None:
            try:
                re.compile(self.last_user_message_regex)
            except re.error as exc:
                raise ValueError(f"lastUserMessageRegex must be a valid regular expression: {exc}") from exc
        return self


class ClassifierSpec(_Spec):
    """A small LLMDeployment asked to choose among the tiers whose rules a request meets (structured output
    `choice` over their names, shown with their descriptions); unavailable, failing or slow: the first of them."""

    deployment: str = Field(
        min_length=1,
        max_length=MAX_NAME_LENGTH,
        pattern=DNS1035_LABEL,
        description="The LLMDeployment that classifies, in the LLMRoute's namespace.",
    )
    instructions: str | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_INSTRUCTIONS_LENGTH,
        description="The system prompt it gets before the tiers' list (default: choose the tier that should answer).",
    )
    timeout_seconds: float = Field(
        default=2.0, gt=0.0, le=60.0, description="Past this the rules decide alone (the first matching tier)."
    )


class RouteTier(_Spec):
    name: str = Field(
        min_length=1,
        max_length=63,
        pattern=TIER_NAME_PATTERN,
        description="The tier's name (a DNS label), as the x-kubellm-route-tier header and the metrics give it.",
    )
    deployment: str = Field(
        min_length=1,
        max_length=MAX_NAME_LENGTH,
        pattern=DNS1035_LABEL,
        description="The LLMDeployment that serves this tier, in the LLMRoute's namespace.",
    )
    when: TierRules | None = Field(
        default=None, description="The rules under which this tier serves; absent: every request (a default tier)."
    )
    description: str | None = Field(
        default=None, min_length=1, max_length=1024, description="What this tier is for, as the classifier reads it."
    )


class LLMRouteSpec(_Spec):
    """A virtual model: a request naming `model` goes to the first tier whose rules it meets (or the next one in
    order while that tier has no ready replica or answers 429 before the first byte)."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "self.tiers.all(t, self.tiers.filter(u, u.name == t.name).size() == 1)",
                    "tiers[].name must be unique",
                    ".tiers",
                )
            ]
        }
    )

    model: str = Field(
        min_length=1,
        max_length=MAX_SERVED_NAME_LENGTH,
        pattern=SERVED_NAME_PATTERN,
        description="The model name clients send. A served model name of an LLMDeployment takes precedence: a route "
        "whose name collides with one is not served (the gateway logs it).",
    )
    tiers: list[RouteTier] = Field(
        min_length=1, max_length=MAX_TIERS, description="Ordered tiers: the first whose rules match serves."
    )
    classifier: ClassifierSpec | None = Field(
        default=None, description="Optional: a model that chooses among the tiers whose rules match."
    )

    @model_validator(mode="after")
    def _check(self) -> LLMRouteSpec:
        names = [t.name for t in self.tiers]
        if len(set(names)) != len(names):
            raise ValueError(f"tiers[].name must be unique, got {names}")
        return self


def parse_route_spec(spec: dict[str, Any]) -> LLMRouteSpec:
    return LLMRouteSpec.model_validate(spec)

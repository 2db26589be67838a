"""LLMRoutes: a virtual model name over ordered tiers of LLMDeployments, and the tier each request goes to.

    request ─▶ Features (prompt tokens, estimated; requested max tokens; tools or not; the last user message)
            ─▶ candidates: the tiers whose rules all hold (a tier without rules: every request)
            ─▶ choose: the first candidate, or, with a classifier and several candidates, the one it names
               (tiers.py asks it; it failing or slow: the first)
            ─▶ tiers_from(choice): that tier, then each later one in order (the proxy falls over along them while
               a tier has no ready replica or answers 429 before the first byte)

Prompt length: the gateway has no tokenizer (it never imports the runtime), so it estimates: the characters of what
the chat template is fed (each message's role and text, the tools' JSON) divided by CHARS_PER_TOKEN, rounded up;
token-id prompts are counted exactly. Measured on SmolLM2's tokenizer (tests/gateway/test_route.py measures it
again): 5.0 characters per token for plain English prose, 3.9 for a short question, 3.2-3.3 for code, YAML and
markdown, 2.6 for German. 4 (the usual rule of thumb) keeps English, code and configuration within about 25% of the
true count; what matters is telling a short question from a long document, which differ far more than that.

The object was validated at admission (the CRD's schema and CEL, operator/route_spec.py); the gateway parses it
again for what it uses and refuses (logs, does not serve) a route whose regex Python cannot compile.

Everything here is pure: no network, no clock.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kubellm.gateway.balance import message_text

JSON = dict[str, Any]
CHARS_PER_TOKEN = 4.0


class RouteError(ValueError):
    """An LLMRoute the gateway cannot serve; the message names the field."""


@dataclass(frozen=True)
class Features:
    """What the rules look at, taken from one request body."""

    prompt_tokens: int
    requested_tokens: int | None  # max_completion_tokens, else max_tokens; None: neither was given
    has_tools: bool
    last_user_text: str


@dataclass(frozen=True)
class Rules:
    """A tier's `when`: every rule given must hold."""

    min_prompt_tokens: int | None = None
    max_prompt_tokens: int | None = None
    max_requested_tokens: int | None = None
    tools: bool | None = None
    last_user_message_regex: re.Pattern[str] | None = None

    def matches(self, f: Features) -> bool:
        if self.min_prompt_tokens is not None and f.prompt_tokens < self.min_prompt_tokens:
            return False
        if self.max_prompt_tokens is not None and f.prompt_tokens > self.max_prompt_tokens:
            return False
        if self.max_requested_tokens is not None and (
            f.requested_tokens is None or f.requested_tokens > self.max_requested_tokens
        ):
            return False
        if self.tools is not None and f.has_tools != self.tools:
            return False
        return self.last_user_message_regex is None or self.last_user_message_regex.search(f.last_user_text) is not None


@dataclass(frozen=True)
class Tier:
    name: str
    deployment: str  # an LLMDeployment in the route's namespace
    rules: Rules
    description: str = ""


@dataclass(frozen=True)
class Classifier:
    deployment: str  # an LLMDeployment in the route's namespace
    instructions: str
    timeout_seconds: float


@dataclass(frozen=True)
class Route:
    namespace: str
    name: str
    model: str  # the virtual model name clients send
    tiers: tuple[Tier, ...]
    classifier: Classifier | None = None

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)

    def candidates(self, features: Features) -> list[int]:
        """The indices of the tiers whose rules hold, in order."""
        return [i for i, tier in enumerate(self.tiers) if tier.rules.matches(features)]

    def choose(self, features: Features) -> int | None:
        """The index of the first tier whose rules hold; None when none does (the route has no default tier)."""
        return next(iter(self.candidates(features)), None)


DEFAULT_INSTRUCTIONS = "Choose the tier that should answer the user's message: the smallest one able to answer it well."
CLASSIFIER_MAX_CHARS = 1000  # of the user's message: the classifier is a small model, its context short


def classifier_messages(classifier: Classifier, tiers: list[Tier], text: str) -> list[JSON]:
    """The chat the classifier answers with one of the tiers' names (the request constrains it to them)."""
    listing = "\n".join(f"- {t.name}: {t.description or 'no description'}" for t in tiers)
    system = f"{classifier.instructions}\nTiers:\n{listing}\nAnswer with the tier's name only."
    return [{"role": "system", "content": system}, {"role": "user", "content": text[:CLASSIFIER_MAX_CHARS]}]


_RULE_FIELDS = {
    "minPromptTokens": "min_prompt_tokens",
    "maxPromptTokens": "max_prompt_tokens",
    "maxRequestedTokens": "max_requested_tokens",
    "tools": "tools",
    "lastUserMessageRegex": "last_user_message_regex",
}


def _rules(when: Any, where: str) -> Rules:
    if when is None:
        return Rules()
    if not isinstance(when, dict):
        raise RouteError(f"{where} must be an object")
    unknown = sorted(set(when) - set(_RULE_FIELDS))
    if unknown:  # a rule this gateway does not know would silently match everything: refuse the route instead
        raise RouteError(f"{where}.{unknown[0]} is not a rule this gateway supports")
    values: dict[str, Any] = {}
    for wire, attr in _RULE_FIELDS.items():
        value = when.get(wire)
        if value is None:
            continue
        if wire == "tools":
            if not isinstance(value, bool):
                raise RouteError(f"{where}.tools must be true or false")
        elif wire == "lastUserMessageRegex":
            try:
                value = re.compile(str(value))
            except re.error as exc:
                raise RouteError(f"{where}.lastUserMessageRegex {value!r} is not a Python regex: {exc}") from exc
        elif not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise RouteError(f"{where}.{wire} must be a non-negative integer")
        values[attr] = value
    return Rules(**values)


def _classifier(spec: Any) -> Classifier | None:
    if spec is None:
        return None
    if not isinstance(spec, dict) or not isinstance(spec.get("deployment"), str):
        raise RouteError("spec.classifier must name a deployment")
    unknown = sorted(set(spec) - {"deployment", "instructions", "timeoutSeconds"})
    if unknown:
        raise RouteError(f"spec.classifier.{unknown[0]} is not a field this gateway supports")
    timeout = spec.get("timeoutSeconds", 2.0)
    if not isinstance(timeout, int | float) or isinstance(timeout, bool) or timeout <= 0:
        raise RouteError("spec.classifier.timeoutSeconds must be a number > 0")
    return Classifier(spec["deployment"], str(spec.get("instructions") or DEFAULT_INSTRUCTIONS), float(timeout))


def parse_route(obj: JSON) -> Route | None:
    """The route of one LLMRoute object; None while it is being deleted; RouteError naming the field it cannot
    serve."""
    meta, spec = obj.get("metadata") or {}, obj.get("spec") or {}
    if meta.get("deletionTimestamp") is not None:
        return None
    model = spec.get("model")
    if not isinstance(model, str) or not model:
        raise RouteError("spec.model must be a model name")
    tiers = spec.get("tiers")
    if not isinstance(tiers, list) or not tiers:
        raise RouteError("spec.tiers must list at least one tier")
    parsed = []
    for i, tier in enumerate(tiers):
        where = f"spec.tiers[{i}]"
        if not isinstance(tier, dict) or not tier.get("name") or not tier.get("deployment"):
            raise RouteError(f"{where} must have a name and a deployment")
        rules = _rules(tier.get("when"), f"{where}.when")
        parsed.append(Tier(str(tier["name"]), str(tier["deployment"]), rules, str(tier.get("description") or "")))
    if len({t.name for t in parsed}) != len(parsed):
        raise RouteError("spec.tiers[].name must be unique")
    namespace, name = str(meta.get("namespace", "")), str(meta.get("name", ""))
    return Route(namespace, name, model, tuple(parsed), _classifier(spec.get("classifier")))


# -- what a request looks like to the rules ---------------------------------------------------------------------


def estimate_tokens(text: str) -> int:
    return math.ceil(len(text) / CHARS_PER_TOKEN)


def _requested(body: Mapping[str, Any]) -> int | None:
    for name in ("max_completion_tokens", "max_tokens"):
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def request_kind(body: Mapping[str, Any]) -> str:
    """ "chat" for a body of messages, else "completions" (a prompt)."""
    return "chat" if isinstance(body.get("messages"), list) else "completions"


def features(kind: str, body: Mapping[str, Any]) -> Features:
    """kind: "chat" (messages) or "completions" (prompt: its text is the last user message; a batch of prompts
    counts its longest)."""
    tools = body.get("tools")
    has_tools = isinstance(tools, list) and len(tools) > 0
    if kind == "chat":
        messages = body.get("messages")
        messages = [m for m in messages if isinstance(m, dict)] if isinstance(messages, list) else []
        fed = "".join(f"{m.get('role', '')}\n{message_text(m.get('content'))}\n" for m in messages)
        if has_tools:
            fed += json.dumps(tools)
        users = [message_text(m.get("content")) for m in messages if m.get("role") == "user"]
        return Features(estimate_tokens(fed), _requested(body), has_tools, users[-1] if users else "")
    prompt = body.get("prompt")
    prompts: list[Any] = prompt if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int) else [prompt]
    counts, last = [], ""
    for p in prompts:
        if isinstance(p, list):  # token ids: counted exactly
            counts.append(len(p))
        else:
            last = str(p or "")
            counts.append(estimate_tokens(last))
    return Features(max(counts, default=0), _requested(body), has_tools, last)

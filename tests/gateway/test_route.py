"""LLMRoutes without a network: parsing the object as the API server stores it, the rules, the tier choice, the
request features (the prompt-token estimate measured against a real tokenizer), and the registry's view of routes
next to LLMDeployments."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import pytest

from kubellm.gateway.discovery import Registry
from kubellm.gateway.route import (
    CHARS_PER_TOKEN,
    Features,
    RouteError,
    Rules,
    estimate_tokens,
    features,
    parse_route,
)

REPO = Path(__file__).resolve().parents[2]


def _route(tiers: list[dict[str, Any]], model: str = "auto", name: str = "r", ns: str = "a") -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": ns}, "spec": {"model": model, "tiers": tiers}}


TIERS = [
    {"name": "small", "deployment": "tiny", "when": {"maxPromptTokens": 100, "tools": False}},
    {"name": "code", "deployment": "coder", "when": {"lastUserMessageRegex": r"(?i)\b(python|rust)\b"}},
    {"name": "large", "deployment": "big"},
]


def _chat(text: str, **extra: Any) -> dict[str, Any]:
    return {"model": "auto", "messages": [{"role": "user", "content": text}], **extra}


def _tier(route_obj: dict[str, Any], body: dict[str, Any]) -> str | None:
    route = parse_route(route_obj)
    assert route is not None
    kind = "chat" if "messages" in body else "completions"
    chosen = route.choose(features(kind, body))
    return None if chosen is None else route.tiers[chosen].name


def test_short_prompts_go_small_long_tool_bearing_and_code_ones_further_down() -> None:
    route = _route(TIERS)
    assert _tier(route, _chat("Say hi.")) == "small"
    assert _tier(route, _chat("word " * 200)) == "large"  # ~286 estimated tokens
    weather = {"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}
    assert _tier(route, _chat("Weather?", tools=[weather])) == "large"
    assert _tier(route, _chat("Weather?", tools=[])) == "small"  # an empty list carries no tools
    # The regex looks at the last user message only, searched anywhere in it.
    long_code = "Please write " + "a very careful and long " * 30 + "function in Python."
    assert _tier(route, _chat(long_code)) == "code"
    history = {"messages": [{"role": "user", "content": "python?"}, {"role": "assistant", "content": "yes"}]}
    history["messages"].append({"role": "user", "content": "x " * 200})
    assert _tier(route, history) == "large"
    # Completions: the prompt is the last user message.
    assert _tier(route, {"model": "auto", "prompt": "Hello"}) == "small"
    assert _tier(route, {"model": "auto", "prompt": list(range(101))}) == "large"  # token ids: counted exactly
    assert _tier(route, {"model": "auto", "prompt": list(range(100))}) == "small"


def test_rules_are_anded_and_requested_tokens_must_be_given_to_match() -> None:
    rules = Rules(min_prompt_tokens=10, max_prompt_tokens=20, max_requested_tokens=64)
    base = Features(prompt_tokens=15, requested_tokens=64, has_tools=False, last_user_text="")
    assert rules.matches(base)
    for changed in (
        Features(9, 64, False, ""),
        Features(21, 64, False, ""),
        Features(15, 65, False, ""),
        Features(15, None, False, ""),  # no max_tokens: the answer may be long, so it is not "at most 64"
    ):
        assert not rules.matches(changed), changed
    assert Rules().matches(Features(10**6, None, True, "anything"))  # no rules: a default tier


def test_requested_tokens_prefer_max_completion_tokens() -> None:
    assert features("chat", _chat("x", max_tokens=500, max_completion_tokens=20)).requested_tokens == 20
    assert features("chat", _chat("x", max_tokens=500)).requested_tokens == 500
    assert features("chat", _chat("x", max_tokens=True)).requested_tokens is None


def test_a_route_without_a_default_tier_can_match_nothing() -> None:
    assert _tier(_route(TIERS[:1]), _chat("word " * 500)) is None


def test_tools_false_and_true_split_requests() -> None:
    route = _route(
        [
            {"name": "plain", "deployment": "a", "when": {"tools": False}},
            {"name": "agent", "deployment": "b", "when": {"tools": True}},
        ]
    )
    assert _tier(route, _chat("hi")) == "plain"
    assert _tier(route, _chat("hi", tools=[{"type": "function", "function": {"name": "f"}}])) == "agent"


@pytest.mark.parametrize(
    ("tiers", "field"),
    [
        ([{"name": "a", "deployment": "x", "when": {"lastUserMessageRegex": "(unclosed"}}], "lastUserMessageRegex"),
        ([{"name": "a", "deployment": "x", "when": {"maxPromptTokens": -1}}], "maxPromptTokens"),
        ([{"name": "a", "deployment": "x", "when": {"tools": "yes"}}], "tools"),
        ([{"name": "a", "deployment": "x", "when": {"minTokens": 3}}], "minTokens"),
        ([{"name": "a", "deployment": "x"}, {"name": "a", "deployment": "y"}], "name must be unique"),
        ([{"name": "a"}], "spec.tiers[0]"),
        ([], "spec.tiers"),
    ],
)
def test_a_route_the_gateway_cannot_serve_is_refused_naming_the_field(tiers: list[Any], field: str) -> None:
    with pytest.raises(RouteError, match=field.replace("[", r"\[").replace("]", r"\]")):
        parse_route(_route(tiers))


def test_a_route_being_deleted_is_gone() -> None:
    obj = _route(TIERS)
    obj["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    assert parse_route(obj) is None


def test_a_larger_prompt_never_goes_to_an_earlier_tier_of_a_size_ladder() -> None:
    """Tiers ordered by maxPromptTokens, a default last: the chosen index never decreases as the prompt grows."""
    seed = int(os.environ.get("KUBELLM_TEST_SEED") or random.SystemRandom().randrange(2**32))
    print(f"seed {seed}")
    rng = random.Random(seed)
    bounds = sorted(rng.sample(range(1, 2000), 4))
    tiers = [{"name": f"t{i}", "deployment": f"d{i}", "when": {"maxPromptTokens": b}} for i, b in enumerate(bounds)]
    route = parse_route(_route([*tiers, {"name": "rest", "deployment": "big"}]))
    assert route is not None
    lengths = sorted(rng.randrange(0, 10_000) for _ in range(200))
    chosen = [route.choose(features("completions", {"prompt": "x" * n})) for n in lengths]
    assert all(c is not None for c in chosen)
    assert chosen == sorted(chosen), (seed, bounds)
    for n, c in zip(lengths, chosen, strict=True):
        tokens = estimate_tokens("x" * n)
        assert c == next((i for i, b in enumerate(bounds) if tokens <= b), len(bounds)), (seed, n)


@pytest.mark.slow  # reading the GGUF's vocabulary takes seconds
def test_the_estimate_stays_within_the_measured_band_of_a_real_tokenizer() -> None:
    """CHARS_PER_TOKEN against SmolLM2's own tokenizer (the bundled GGUF's vocabulary) on prose, code and YAML:
    the estimate is within 35% of the true count for each, and the measured ratios bracket the constant."""
    from kubellm.runtime.models.gguf import gguf_to_tokenizer, open_gguf
    from kubellm.runtime.models.loader import builtin_model_path

    tokenizer = gguf_to_tokenizer(open_gguf(builtin_model_path("smollm2-135m-instruct")))
    texts = {
        "markdown": (REPO / "README.md").read_text()[:20000],
        "python": (REPO / "gateway" / "proxy.py").read_text(),
        "yaml": (REPO / "crds" / "kubellm.io_llmroutes.yaml").read_text(),
        "question": "Say hi. What is the capital of France? Answer in one word.",
    }
    ratios = {}
    for name, text in texts.items():
        true = len(tokenizer.encode(text).ids)
        ratios[name] = len(text) / true
        assert abs(estimate_tokens(text) - true) <= 0.35 * true, (name, true, estimate_tokens(text))
    print({k: round(v, 2) for k, v in ratios.items()})
    assert min(ratios.values()) <= CHARS_PER_TOKEN <= max(ratios.values()), ratios


# -- the registry --------------------------------------------------------------------------------------------------


def _llmd(name: str, ns: str = "a", served: str | None = None) -> dict[str, Any]:
    model: dict[str, Any] = {"source": "builtin:x", **({"servedModelName": served} if served else {})}
    return {"metadata": {"name": name, "namespace": ns}, "spec": {"model": model}}


def test_registry_serves_routes_unless_an_llmdeployment_serves_the_name(caplog: pytest.LogCaptureFixture) -> None:
    registry = Registry()
    registry.replace_models([_llmd("tiny"), _llmd("big")], "a")
    registry.replace_routes([_route(TIERS, model="auto"), _route(TIERS, model="tiny", name="clash")], "a")
    assert set(registry.routes_by_model()) == {"auto"}  # "tiny" is an LLMDeployment's served name: it wins
    assert "LLMRoute a/clash is not served" in caplog.text and "LLMDeployment a/tiny" in caplog.text
    route = registry.lookup_route("auto")
    assert route is not None and [t.deployment for t in route.tiers] == ["tiny", "coder", "big"]
    assert registry.deployment("a", "big") is not None and registry.deployment("a", "coder") is None
    # A second route of one name: the first by (namespace, name) keeps it.
    registry.route_event("ADDED", _route(TIERS[1:], model="auto", name="z-later"))
    assert registry.lookup_route("auto") == route
    # Updates and deletes follow the watch; an update the gateway cannot serve drops the route, with a log line.
    registry.route_event("MODIFIED", _route([{"name": "x", "deployment": "y", "when": {"tools": 1}}]))
    moved = registry.lookup_route("auto")
    assert moved is not None and moved.name == "z-later"
    assert "LLMRoute a/r is not served: spec.tiers[0].when.tools" in caplog.text
    registry.route_event("DELETED", _route(TIERS[1:], model="auto", name="z-later"))
    assert registry.lookup_route("auto") is None
    # The LLMDeployment goes: the route that named its served name is served at last.
    registry.model_event("DELETED", _llmd("tiny"))
    assert registry.lookup_route("tiny") is not None


def test_a_namespace_relist_replaces_only_its_routes() -> None:
    registry = Registry()
    registry.replace_routes([_route(TIERS, model="one", ns="a")], "a")
    registry.replace_routes([_route(TIERS, model="two", ns="b")], "b")
    registry.replace_routes([], "a")
    assert set(registry.routes_by_model()) == {"two"}

"""LLMRoutes without a network: parsing the object as the API server stores it, the rules, the tier choice, the
request features (the prompt-token estimate measured against a real tokenizer), and the registry's view of routes
next to LLMDeployments."""

from __future__ import annotations

import os
import random
from typing import Any

import pytest

from kubellm.gateway.discovery import Registry
from kubellm.gateway.route import (
    CHARS_PER_TOKEN,
    CLASSIFIER_MAX_CHARS,
    Features,
    RouteError,
    Rules,
    classifier_messages,
    estimate_tokens,
    features,
    parse_route,
)


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
    assert _tier(route, _chat("word " * 200)) == "large"  # ~250 estimated tokens
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
        ([{"name": "a", "deployment": "x"}], "spec.classifier.timeoutSeconds"),
        ([], "spec.tiers"),
    ],
)
def test_a_route_the_gateway_cannot_serve_is_refused_naming_the_field(tiers: list[Any], field: str) -> None:
    obj = _route(tiers)
    if "classifier" in field:
        obj["spec"]["classifier"] = {"deployment": "judge", "timeoutSeconds": 0}
    with pytest.raises(RouteError, match=field.replace("[", r"\[").replace("]", r"\]")):
        parse_route(obj)


def test_the_classifier_sees_the_candidates_with_their_descriptions_and_a_bounded_message() -> None:
    tiers = [{**t, "description": f"for {t['name']} things"} for t in TIERS]
    obj = _route(tiers)
    obj["spec"]["classifier"] = {"deployment": "judge", "instructions": "Pick wisely."}
    route = parse_route(obj)
    assert route is not None and route.classifier is not None
    assert (route.classifier.deployment, route.classifier.timeout_seconds) == ("judge", 2.0)
    short = features("chat", _chat("Say hi."))
    assert route.candidates(short) == [0, 2]  # small's rules and the default; not the code tier's regex
    system, user = classifier_messages(route.classifier, [route.tiers[0], route.tiers[2]], "x" * 5000)
    assert system["content"].startswith("Pick wisely.") and "- small: for small things" in system["content"]
    assert "- large: for large things" in system["content"] and "code" not in system["content"]
    assert user == {"role": "user", "content": "x" * CLASSIFIER_MAX_CHARS}


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


# Fixed samples (the repository's files change; these do not): prose, code, configuration, a short question.
SAMPLES = {
    "prose": (
        "The gateway has no tokenizer of its own, so it estimates the length of a prompt from its characters. "
        "Most English text spends between three and four characters on a token; code with long identifiers a "
        "little more, and languages with many accented or compound words a little less. The estimate only has to "
        "be good enough to tell a short question from a long document, which differ by orders of magnitude."
    ),
    "code": (
        "def pick_least(replicas: Sequence[str], loads: Mapping[str, Load], turn: int = 0) -> Pick:\n"
        "    if not replicas:\n"
        '        raise ValueError("no replica to pick from")\n'
        "    ordered = sorted(replicas)\n"
        "    rotated = ordered[turn % len(ordered) :] + ordered[: turn % len(ordered)]\n"
        "    best = min(rotated, key=lambda r: (loads.get(r, Load()).total, loads.get(r, Load()).kv_usage))\n"
        "    return Pick(best, Decision.LEAST_LOAD)\n"
    ),
    "yaml": (
        "apiVersion: kubellm.io/v1alpha1\nkind: LLMRoute\nmetadata:\n  name: assistant\nspec:\n  model: assistant\n"
        "  tiers:\n    - name: small\n      deployment: qwen-small\n      when:\n        maxPromptTokens: 1024\n"
        "        tools: false\n    - name: large\n      deployment: qwen-large\n"
    ),
    "question": "Say hi. What is the capital of France? Answer in one word.",
}


@pytest.mark.slow  # reading the GGUF's vocabulary takes seconds
def test_the_estimate_stays_within_the_measured_band_of_a_real_tokenizer() -> None:
    """CHARS_PER_TOKEN against SmolLM2's own tokenizer (the bundled GGUF's vocabulary): the estimate is within 30%
    of the true count for English prose, code, YAML and a question, and the measured ratios bracket the constant."""
    from kubellm.runtime.models.gguf import open_gguf
    from kubellm.runtime.models.gguf_tokenizer import gguf_to_tokenizer
    from kubellm.runtime.models.loader import builtin_model_path

    tokenizer = gguf_to_tokenizer(open_gguf(builtin_model_path("smollm2-135m-instruct")))
    ratios = {}
    for name, text in SAMPLES.items():
        true = len(tokenizer.encode(text).ids)
        ratios[name] = len(text) / true
        assert abs(estimate_tokens(text) - true) <= 0.3 * true, (name, true, estimate_tokens(text))
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

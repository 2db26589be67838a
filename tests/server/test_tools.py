"""Tool calling and token controls through the official `openai` client against a real server (bundled SmolLM2).

``tool_choice: "required"`` and a named function are enforced by a grammar, so even the 135M model's calls
validate against the functions' ``parameters`` (checked with ``jsonschema``).
"""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import openai
import pytest

MODEL = "smollm2"

# small on purpose: on a shared 2-core machine every generated token counts
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"enum": ["Paris", "Rome", "Oslo"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "days"],
    "additionalProperties": False,
}
TIME = {
    "type": "object",
    "properties": {"utc": {"type": "boolean"}},
    "required": ["utc"],
    "additionalProperties": False,
}
TOOLS: list[Any] = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather forecast", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "description": "Current time", "parameters": TIME}},
]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
ASK: list[Any] = [{"role": "user", "content": "What is the weather in Paris for the next 3 days?"}]


@pytest.fixture(scope="module")
def client(server: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url("/v1"), api_key="unused", max_retries=0, timeout=600)


def _check_calls(calls: Any) -> None:
    assert calls, "no tool calls"
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_tool_choice_required_calls_validate(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model=MODEL,
        messages=ASK,
        tools=TOOLS,
        tool_choice="required",
        max_tokens=60,
        temperature=0.7,
        seed=1,
        parallel_tool_calls=False,  # one call (~25 tokens): a tiny model may otherwise chain calls to max_tokens
    )
    for choice in r.choices:
        assert choice.finish_reason == "tool_calls", choice
        assert choice.message.content is None
        _check_calls(choice.message.tool_calls)


def test_named_tool_choice_validates_and_streams_the_same(client: openai.OpenAI) -> None:
    named: Any = {"type": "function", "function": {"name": "get_weather"}}
    kwargs: dict[str, Any] = {
        "model": MODEL, "messages": ASK, "tools": TOOLS, "tool_choice": named, "max_tokens": 30, "temperature": 0,
    }  # fmt: skip
    r = client.chat.completions.create(**kwargs)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls is not None and [c.function.name for c in choice.message.tool_calls] == [
        "get_weather"
    ]
    _check_calls(choice.message.tool_calls)

    # streamed: id and name first, then argument fragments that concatenate to the same arguments
    ids, names, fragments, finish = [], [], [], None
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        for c in chunk.choices:
            finish = c.finish_reason or finish
            assert not c.delta.content
            for tc in c.delta.tool_calls or []:
                assert tc.index == 0
                if tc.id:
                    assert not fragments, "the id and name come before any argument fragment"
                    ids.append(tc.id)
                    names.append(tc.function.name)
                if tc.function and tc.function.arguments:
                    fragments.append(tc.function.arguments)
    assert finish == "tool_calls"
    assert len(ids) == 1 and names == ["get_weather"]
    assert len(fragments) > 1
    assert "".join(fragments) == choice.message.tool_calls[0].function.arguments


def test_required_streamed_reassembles_to_non_streamed(client: openai.OpenAI) -> None:
    kwargs: dict[str, Any] = {
        "model": MODEL, "messages": ASK, "tools": TOOLS, "tool_choice": "required", "max_tokens": 40,
        "temperature": 0, "parallel_tool_calls": False,
    }  # fmt: skip
    whole = client.chat.completions.create(**kwargs).choices[0].message.tool_calls
    assert whole is not None and len(whole) == 1  # parallel_tool_calls false: at most one
    calls: dict[int, dict[str, str]] = {}
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        for c in chunk.choices:
            for tc in c.delta.tool_calls or []:
                entry = calls.setdefault(tc.index, {"name": "", "arguments": ""})
                if tc.function and tc.function.name:
                    entry["name"] = tc.function.name
                if tc.function and tc.function.arguments:
                    entry["arguments"] += tc.function.arguments
    assert [(c["name"], c["arguments"]) for _, c in sorted(calls.items())] == [
        (c.function.name, c.function.arguments) for c in whole
    ]


def test_two_turn_conversation_with_a_tool_result(client: openai.OpenAI, server: Any) -> None:
    first = client.chat.completions.create(
        model=MODEL,
        messages=ASK,
        tools=TOOLS,
        tool_choice="required",
        max_tokens=60,
        temperature=0,
        parallel_tool_calls=False,
    )
    calls = first.choices[0].message.tool_calls
    assert calls
    history: list[Any] = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [c.model_dump() for c in calls]},
        *({"role": "tool", "tool_call_id": c.id, "content": '{"forecast": "sunny, 21 C"}'} for c in calls),
    ]
    second = client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, max_tokens=6, temperature=0)
    message = second.choices[0].message
    assert message.content or message.tool_calls  # auto: the hermes parser read the answer
    # the tool result and the call reached the prompt (not stripped): the prompt grew by more than the result
    status, _, raw = server.request("POST", "/tokenize", {"messages": history})
    assert status == 200
    tokens = json.loads(raw)["tokens"]
    status, _, raw = server.request("POST", "/detokenize", {"tokens": tokens})
    text = json.loads(raw)["prompt"]
    assert "sunny, 21 C" in text and calls[0].function.name in text


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tools": [TOOLS[0], TOOLS[0]]}, "tools"),
        ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "bogus"}}}],
          "tool_choice": "required"}, "tools"),
        ({"logit_bias": {"5": 101}}, "logit_bias"),
        ({"logit_bias": {"99999999": 1}}, "logit_bias"),
        ({"allowed_token_ids": [10**8]}, "allowed_token_ids"),
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"prediction": {"type": "content", "content": "x"}}, "prediction"),
    ],
)  # fmt: skip
def test_bad_tool_and_token_fields_are_400(server: Any, body: dict[str, Any], param: str) -> None:
    status, _, raw = server.request(
        "POST", "/v1/chat/completions", {"model": MODEL, "messages": ASK, "max_tokens": 4, **body}
    )
    doc = json.loads(raw)
    assert status == 400, doc
    assert doc["error"]["param"] == param, doc


def test_logit_bias_keeps_a_token_out_and_forces_one(client: openai.OpenAI, tokenizer: Any) -> None:
    prompt = "The capital of France is"
    free = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, temperature=0)
    first = tokenizer.encode(free.choices[0].text, add_special_tokens=False)[0]
    banned = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=1, temperature=0, logit_bias={str(first): -100}
    )
    assert tokenizer.encode(banned.choices[0].text, add_special_tokens=False)[0] != first
    forced_id = tokenizer.encode(" banana", add_special_tokens=False)[0]
    forced = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=3, temperature=1.0, seed=5, logit_bias={str(forced_id): 100}
    )
    ids = tokenizer.encode(forced.choices[0].text, add_special_tokens=False)
    assert ids and all(t == forced_id for t in ids), forced.choices[0].text


def test_allowed_token_ids_and_bad_words(client: openai.OpenAI, tokenizer: Any) -> None:
    allowed = tokenizer.encode(" yes no", add_special_tokens=False)
    r = client.completions.create(
        model=MODEL, prompt="Answer:", max_tokens=4, extra_body={"allowed_token_ids": allowed, "ignore_eos": True}
    )
    assert set(tokenizer.encode(r.choices[0].text, add_special_tokens=False)) <= set(allowed)
    free = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=4, temperature=0)
    word = free.choices[0].text.split()[0]
    r = client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=4, temperature=0, extra_body={"bad_words": [word]}
    )
    assert word not in r.choices[0].text.split()


def test_fields_that_do_not_change_the_answer_are_accepted(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model=MODEL,
        messages=ASK,
        max_tokens=2,
        user="u-1",
        metadata={"k": "v"},
        store=False,
        service_tier="auto",
        extra_body={"some_future_field": 1},
    )
    assert r.choices[0].message.content is not None
    assert r.usage is not None and r.usage.prompt_tokens_details is not None
    # the same prompt twice: the second is served (partly) from the prefix cache
    again = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=2)
    assert again.usage is not None and again.usage.prompt_tokens_details is not None
    assert again.usage.prompt_tokens_details.cached_tokens > 0


def test_continuous_usage_stats(client: openai.OpenAI) -> None:
    counts = []
    for chunk in client.chat.completions.create(
        model=MODEL,
        messages=ASK,
        max_tokens=5,
        stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True},  # type: ignore[typeddict-unknown-key]
    ):
        assert chunk.usage is not None
        counts.append(chunk.usage.completion_tokens)
    assert counts == sorted(counts) and counts[-1] == 5

"""Structured outputs through the official `openai` client against a real server on the bundled SmolLM2.

Every constrained answer is checked with an oracle we did not write: ``jsonschema`` for JSON schemas, ``re`` for
regexes. Schemas that the grammar compiler rejects are a 400 naming the field the client sent them in.
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import jsonschema
import openai
import pytest

MODEL = "smollm2"

SCHEMAS: dict[str, dict[str, Any]] = {
    "nested": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 20},
            "address": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 20}, "zip": {"type": "integer"}},
                "required": ["city", "zip"],
                "additionalProperties": False,
            },
        },
        "required": ["name", "address"],
        "additionalProperties": False,
    },
    "array_bounds": {
        "type": "object",
        "properties": {
            "colors": {"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 2, "maxItems": 3}
        },
        "required": ["colors"],
        "additionalProperties": False,
    },
    "enum_and_range": {
        "type": "object",
        "properties": {
            "size": {"enum": ["small", "medium", "large"]},
            "count": {"type": "integer", "minimum": 1, "maximum": 9},
            "ok": {"type": "boolean"},
        },
        "required": ["size", "count", "ok"],
        "additionalProperties": False,
    },
    "defs_ref": {
        "type": "object",
        "$defs": {
            "point": {
                "type": "object",
                "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}},
                "required": ["x", "y"],
                "additionalProperties": False,
            }
        },
        "properties": {"start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"}},
        "required": ["start", "end"],
        "additionalProperties": False,
    },
}


@pytest.fixture(scope="module")
def client(server: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url("/v1"), api_key="unused", max_retries=0, timeout=600)


def _user(text: str) -> list[Any]:
    return [{"role": "user", "content": text}]


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_json_schema_strict_outputs_validate(client: openai.OpenAI, name: str) -> None:
    schema = SCHEMAS[name]
    r = client.chat.completions.create(
        model=MODEL,
        messages=_user(f"Give me an example {name.replace('_', ' ')} record as JSON."),
        max_tokens=120,
        temperature=0.8,
        seed=7,
        response_format={"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}},
    )
    choice = r.choices[0]
    assert choice.finish_reason == "stop", choice  # the grammar closed the object before max_tokens
    jsonschema.validate(json.loads(choice.message.content or ""), schema)


def test_json_object_on_completions_and_n_choices(client: openai.OpenAI) -> None:
    r = client.completions.create(
        model=MODEL,
        prompt="A JSON object describing a cat:",
        max_tokens=40,
        temperature=1.0,
        seed=3,
        n=2,
        extra_body={"response_format": {"type": "json_object"}},
    )
    assert len(r.choices) == 2
    for choice in r.choices:
        if choice.finish_reason == "stop":
            assert isinstance(json.loads(choice.text), dict)
        else:  # cut by max_tokens: still a prefix the grammar allowed
            assert choice.text.lstrip().startswith("{")


def test_choice_and_regex_match(client: openai.OpenAI) -> None:
    options = ["positive", "negative", "neutral"]
    r = client.chat.completions.create(
        model=MODEL,
        messages=_user("Is 'I love it' positive or negative?"),
        max_tokens=10,
        extra_body={"structured_outputs": {"choice": options}},
    )
    assert r.choices[0].message.content in options
    r = client.chat.completions.create(
        model=MODEL,
        messages=_user("Write a date."),
        max_tokens=20,
        extra_body={"guided_regex": r"20[0-9]{2}-(0[1-9]|1[0-2])-[0-3][0-9]"},
    )
    assert re.fullmatch(r"20[0-9]{2}-(0[1-9]|1[0-2])-[0-3][0-9]", r.choices[0].message.content or "")
    r = client.completions.create(
        model=MODEL, prompt="Pick a color:", max_tokens=10, extra_body={"guided_choice": ["red", "green"]}
    )
    assert r.choices[0].text in ("red", "green")


def test_grammar_ebnf(client: openai.OpenAI) -> None:
    grammar = 'root ::= "yes" | "no" | "maybe " [0-9]'
    r = client.chat.completions.create(
        model=MODEL,
        messages=_user("Will it rain?"),
        max_tokens=10,
        extra_body={"structured_outputs": {"grammar": grammar}},
    )
    assert re.fullmatch(r"yes|no|maybe [0-9]", r.choices[0].message.content or "")


def test_streamed_json_schema_validates(client: openai.OpenAI) -> None:
    schema = SCHEMAS["enum_and_range"]
    text = []
    finish = None
    for chunk in client.chat.completions.create(
        model=MODEL,
        messages=_user("A shirt as JSON."),
        max_tokens=80,
        stream=True,
        extra_body={"guided_json": schema},
    ):
        for c in chunk.choices:
            text.append(c.delta.content or "")
            finish = c.finish_reason or finish
    assert finish == "stop"
    jsonschema.validate(json.loads("".join(text)), schema)


def test_constrained_and_free_requests_share_a_batch(server: Any) -> None:
    """Interleaved: free and constrained requests at once; the free ones are untouched by the others' grammars."""
    aclient = openai.AsyncOpenAI(base_url=server.url("/v1"), api_key="unused", max_retries=0, timeout=600)
    schema = SCHEMAS["array_bounds"]
    prompt = _user("List some colors.")

    async def free() -> str:
        r = await aclient.chat.completions.create(model=MODEL, messages=prompt, max_tokens=24, temperature=0)
        return r.choices[0].message.content or ""

    async def constrained() -> str:
        r = await aclient.chat.completions.create(
            model=MODEL,
            messages=prompt,
            max_tokens=60,
            temperature=0,
            response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": schema}},
        )
        return r.choices[0].message.content or ""

    async def run() -> tuple[str, list[str]]:
        alone = await free()
        results = await asyncio.gather(*(f() for f in (free, constrained, free, constrained)))
        await aclient.close()
        return alone, list(results)

    alone, results = asyncio.run(run())
    # greedy free answers in a mixed batch equal the answer alone (batch invariance: the engine's promise in float32)
    assert results[0] == results[2] == alone
    for text in (results[1], results[3]):
        jsonschema.validate(json.loads(text), schema)
    server.wait_idle()


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
         "response_format.json_schema.schema"),
        ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs.regex"),
        ({"guided_regex": "[a-"}, "guided_regex"),
        ({"structured_outputs": {"grammar": "root ::= undefined_rule"}}, "structured_outputs.grammar"),
        ({"guided_grammar": "root ::= ("}, "guided_grammar"),
        ({"guided_json": {"type": "object", "not": {"required": ["a"]}}}, "guided_json"),
        ({"guided_choice": []}, "guided_choice"),
        ({"guided_regex": "a+", "guided_choice": ["a"]}, "guided_choice"),
        ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
        ({"guided_whitespace_pattern": " *", "guided_json": {"type": "object"}}, "guided_whitespace_pattern"),
    ],
)  # fmt: skip
def test_bad_constraints_are_400_naming_the_field(server: Any, extra: dict[str, Any], param: str) -> None:
    for path, body in (
        ("/v1/chat/completions", {"messages": _user("hi"), "max_tokens": 4}),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 4}),
    ):
        status, _, raw = server.request("POST", path, {"model": MODEL, **body, **extra})
        doc = json.loads(raw)
        assert status == 400, (path, doc)
        assert doc["error"]["param"] == param, (path, doc)
        assert doc["error"]["message"]

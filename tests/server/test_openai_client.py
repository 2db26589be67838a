"""The official `openai` client, sync and async, against a real server on loopback serving the real SmolLM2."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import openai
import pytest

MODEL = "smollm2"
MESSAGES: list[Any] = [{"role": "user", "content": "Name three colors."}]


@pytest.fixture(scope="module")
def client(server: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url("/v1"), api_key="unused", max_retries=0, timeout=120)


@pytest.fixture
def aclient(server: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.url("/v1"), api_key="unused", max_retries=0, timeout=120)


def _chat_prompt_tokens(server: Any, messages: list[dict[str, str]]) -> int:
    status, _, body = server.request("POST", "/tokenize", {"messages": messages})
    assert status == 200
    import json

    return int(json.loads(body)["count"])


def test_models(client: openai.OpenAI) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_chat_non_streaming_usage_matches_tokenizer(client: openai.OpenAI, server: Any, tokenizer: Any) -> None:
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6, temperature=0)
    assert r.object == "chat.completion"
    assert r.id.startswith("chatcmpl-")
    assert r.model == MODEL
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert r.usage is not None
    rendered = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True)
    assert r.usage.prompt_tokens == len(tokenizer.encode(rendered, add_special_tokens=False))
    assert r.usage.prompt_tokens == _chat_prompt_tokens(server, MESSAGES)
    if choice.finish_reason == "length":
        assert r.usage.completion_tokens == 6
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_completion_usage_and_greedy_text_match_tokenizer(client: openai.OpenAI, tokenizer: Any) -> None:
    prompt = "The capital of France is"
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, temperature=0, logprobs=1)
    assert r.object == "text_completion"
    assert r.usage is not None
    assert r.usage.prompt_tokens == len(tokenizer.encode(prompt))
    choice = r.choices[0]
    assert choice.finish_reason == "length"
    assert r.usage.completion_tokens == 5
    assert choice.logprobs is not None
    assert len(choice.logprobs.tokens or []) == 5
    # The text is exactly the sampled tokens, decoded.
    assert "".join(choice.logprobs.tokens or []) == choice.text


def test_chat_streaming_matches_non_streaming_greedy(client: openai.OpenAI) -> None:
    kwargs: dict[str, Any] = {"model": MODEL, "messages": MESSAGES, "max_tokens": 8, "temperature": 0}
    full = client.chat.completions.create(**kwargs)
    stream = client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})
    text, reasons, usage = [], [], None
    for chunk in stream:
        assert chunk.object == "chat.completion.chunk"
        assert chunk.model == MODEL
        if chunk.usage is not None:
            usage = chunk.usage
            assert chunk.choices == []
        for c in chunk.choices:
            text.append(c.delta.content or "")
            if c.finish_reason:
                reasons.append(c.finish_reason)
    assert "".join(text) == full.choices[0].message.content
    assert reasons == [full.choices[0].finish_reason]
    assert usage is not None and full.usage is not None
    assert usage.prompt_tokens == full.usage.prompt_tokens
    assert usage.completion_tokens == full.usage.completion_tokens


def test_completion_streaming(client: openai.OpenAI) -> None:
    kwargs: dict[str, Any] = {"model": MODEL, "prompt": "One, two, three,", "max_tokens": 6, "temperature": 0}
    full = client.completions.create(**kwargs)
    pieces = [c.choices[0].text for c in client.completions.create(**kwargs, stream=True) if c.choices]
    assert "".join(pieces) == full.choices[0].text


def test_n_choices_are_distinct_and_complete(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6, n=3, temperature=1.0, seed=7)
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    assert all(c.finish_reason in ("stop", "length") for c in r.choices)
    assert r.usage is not None
    assert r.usage.completion_tokens >= 3
    assert len({c.message.content for c in r.choices}) > 1, "n=3 sampled choices were all identical"


def test_n_streaming_covers_every_index(client: openai.OpenAI) -> None:
    stream = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=4, n=2, stream=True)
    finished = {c.index for chunk in stream for c in chunk.choices if c.finish_reason}
    assert finished == {0, 1}


def test_stop_string_cuts_the_output(client: openai.OpenAI) -> None:
    prompt = "1, 2, 3, 4, 5, 6,"
    free = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
    text = free.choices[0].text
    assert "," in text, f"greedy continuation has no comma to stop at: {text!r}"
    stopped = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, stop=[","])
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == text[: text.index(",")]


def test_seed_gives_identical_outputs(client: openai.OpenAI) -> None:
    kwargs: dict[str, Any] = {"model": MODEL, "messages": MESSAGES, "max_tokens": 10, "temperature": 1.0, "seed": 1234}
    a = client.chat.completions.create(**kwargs)
    b = client.chat.completions.create(**kwargs)
    assert a.choices[0].message.content == b.choices[0].message.content


def test_chat_logprobs(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    lp = r.choices[0].logprobs
    assert lp is not None and lp.content is not None
    assert len(lp.content) == r.usage.completion_tokens  # type: ignore[union-attr]
    assert "".join(t.token for t in lp.content) == r.choices[0].message.content
    for t in lp.content:
        assert t.logprob <= 0.0 and math.isfinite(t.logprob)
        assert len(t.top_logprobs) == 3
        # Greedy: the sampled token is the most likely one.
        assert t.logprob == pytest.approx(max(x.logprob for x in t.top_logprobs), abs=1e-4)


def test_bad_parameter_is_a_400_naming_the_field(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, temperature=5)
    assert info.value.status_code == 400
    assert "temperature" in str(info.value)


async def test_async_client_chat_and_completion_concurrently(aclient: openai.AsyncOpenAI) -> None:
    async def chat() -> str:
        r = await aclient.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5, temperature=0)
        return r.choices[0].message.content or ""

    async def completion_stream() -> str:
        stream = await aclient.completions.create(model=MODEL, prompt="Hello", max_tokens=5, temperature=0, stream=True)
        return "".join([c.choices[0].text async for c in stream if c.choices])

    a, b, c = await asyncio.gather(chat(), completion_stream(), chat())
    assert a and b and c
    await aclient.close()

"""Scoring prompts over HTTP, with the official `openai` client against the real SmolLM2: `/v1/completions` with
`echo` + `logprobs` and `max_tokens: 0` (lm-evaluation-harness' loglikelihood requests), and vLLM's
`prompt_logprobs` on completions and chat."""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest

MODEL = "smollm2"
PROMPT = "The capital of France is Paris. The capital of Italy is"


@pytest.fixture(scope="module")
def client(server: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url("/v1"), api_key="unused", max_retries=0, timeout=120)


def prompt_ids(server: Any, prompt: str) -> list[int]:
    status, _, body = server.request("POST", "/tokenize", {"prompt": prompt})
    assert status == 200
    return list(json.loads(body)["tokens"])


def test_echo_logprobs_with_max_tokens_0_scores_the_prompt_only(client: openai.OpenAI, server: Any) -> None:
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=0, echo=True, logprobs=2, temperature=0)
    choice = r.choices[0]
    assert choice.text == PROMPT
    assert choice.finish_reason == "length"
    assert r.usage is not None and r.usage.completion_tokens == 0
    lp = choice.logprobs
    assert lp is not None and lp.tokens is not None and lp.token_logprobs is not None and lp.top_logprobs is not None
    assert len(lp.tokens) == len(prompt_ids(server, PROMPT)) == r.usage.prompt_tokens
    assert "".join(lp.tokens) == PROMPT
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(x is not None and x <= 0 for x in lp.token_logprobs[1:])
    # each position: the prompt token and the 2 most likely ones, none more likely than the best alternative
    for token, value, top in zip(lp.tokens[1:], lp.token_logprobs[1:], lp.top_logprobs[1:], strict=True):
        assert top is not None and token in top and 2 <= len(top) <= 3
        assert value is not None and value <= max(top.values()) + 1e-6
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]


def test_a_scored_token_has_the_logprob_it_had_when_generated(client: openai.OpenAI) -> None:
    """The engine's own oracle on real weights: generate one greedy token after the prompt, then score prompt +
    that token; its prompt logprob is the logprob it was sampled with."""
    gen = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=1, logprobs=0, temperature=0)
    glp = gen.choices[0].logprobs
    assert glp is not None and glp.token_logprobs is not None and glp.token_logprobs[0] is not None
    text = PROMPT + gen.choices[0].text
    scored = client.completions.create(model=MODEL, prompt=text, max_tokens=0, echo=True, logprobs=0)
    slp = scored.choices[0].logprobs
    assert slp is not None and slp.token_logprobs is not None and slp.tokens is not None
    assert slp.tokens[-1] == gen.choices[0].text
    assert slp.token_logprobs[-1] == pytest.approx(glp.token_logprobs[0], abs=2e-3)


def test_echo_logprobs_then_generated_tokens_streamed_and_not(client: openai.OpenAI) -> None:
    kwargs: dict[str, Any] = dict(model=MODEL, prompt=PROMPT, max_tokens=3, echo=True, logprobs=1, temperature=0)
    whole = client.completions.create(**kwargs)
    lp = whole.choices[0].logprobs
    assert lp is not None and lp.tokens is not None and lp.text_offset is not None
    assert whole.choices[0].text.startswith(PROMPT) and len(whole.choices[0].text) > len(PROMPT)
    n_prompt = len(lp.tokens) - 3
    assert lp.text_offset[n_prompt] == len(PROMPT)
    assert "".join(lp.tokens[n_prompt:]) == whole.choices[0].text[len(PROMPT) :]
    text, tokens, values = "", [], []
    for chunk in client.completions.create(**kwargs, stream=True):
        for c in chunk.choices:
            text += c.text
            if c.logprobs is not None and c.logprobs.tokens:
                tokens += c.logprobs.tokens
                values += c.logprobs.token_logprobs or []
    assert text == whole.choices[0].text
    assert tokens == lp.tokens
    assert values[0] is None
    assert values[1:] == pytest.approx(lp.token_logprobs[1:] if lp.token_logprobs else [], abs=1e-4)


def test_vllm_prompt_logprobs_on_completions_and_chat(client: openai.OpenAI, server: Any) -> None:
    ids = prompt_ids(server, PROMPT)
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=1, extra_body={"prompt_logprobs": 2})
    entries = r.model_dump()["choices"][0]["prompt_logprobs"]
    assert len(entries) == len(ids) and entries[0] is None
    echo = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=0, echo=True, logprobs=0)
    assert echo.choices[0].logprobs is not None and echo.choices[0].logprobs.token_logprobs is not None
    for token_id, entry, value in zip(ids[1:], entries[1:], echo.choices[0].logprobs.token_logprobs[1:], strict=True):
        assert str(token_id) in entry and 2 <= len(entry) <= 3
        assert entry[str(token_id)]["logprob"] == pytest.approx(value, abs=1e-4)
        assert entry[str(token_id)]["rank"] >= 1
        assert {e["rank"] for k, e in entry.items() if k != str(token_id)} <= {1, 2}
    messages: Any = [{"role": "user", "content": "Hi"}]
    chat = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=1, extra_body={"prompt_logprobs": 0}
    )
    scored = chat.model_dump()["prompt_logprobs"]
    assert chat.usage is not None and len(scored) == chat.usage.prompt_tokens and scored[0] is None
    assert all(len(e) == 1 and next(iter(e.values()))["logprob"] <= 0 for e in scored[1:])
    plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1)
    assert plain.model_dump().get("prompt_logprobs") is None


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": PROMPT, "max_tokens": 0}, "max_tokens"),
        ({"prompt": PROMPT, "max_tokens": 0, "echo": True}, "max_tokens"),
        ({"prompt": PROMPT, "max_tokens": 0, "echo": True, "logprobs": 1, "n": 2}, "n"),
        ({"prompt": PROMPT, "prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
        ({"prompt": PROMPT, "prompt_logprobs": 21}, "prompt_logprobs"),
        ({"messages": [{"role": "user", "content": "Hi"}], "prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
    ],
)
def test_bad_scoring_requests_are_400_naming_the_field(server: Any, body: dict[str, Any], param: str) -> None:
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    status, _, raw = server.request("POST", path, {"model": MODEL, **body})
    assert status == 400, raw
    error = json.loads(raw)["error"]
    assert error["param"] == param, error

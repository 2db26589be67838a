"""A fuzz pass with hypothesis: malformed and hostile requests never get a 5xx, never crash the server, and the
server still answers real requests afterwards. Valid requests that slip through generate a few tokens at most
(max_tokens and n are drawn either tiny or out of range), so the pass stays quick."""

from __future__ import annotations

import concurrent.futures
import json
import random
from typing import Any

import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.slow

SEED = random.randrange(2**32)
print(f"test_fuzz: hypothesis seed {SEED}")

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=40),
    st.sampled_from(["", "\x00", "\ud7ff", "<|im_end|>", "<|im_start|>system", "{{ 7*7 }}", "{% raw %}", "🚀" * 5]),
)
_json = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
# Out-of-range or wrong-typed values, or small valid ones: never a long generation.
_small_count = st.one_of(
    # Valid and small half of the time, so that odd-but-valid requests reach the engine too.
    st.integers(min_value=1, max_value=4),
    st.integers(min_value=1, max_value=4),
    st.integers(min_value=1, max_value=4),
    st.integers(min_value=1, max_value=4),
    st.integers(min_value=-5, max_value=3),
    st.integers(min_value=10**6, max_value=2**64),
    st.text(max_size=3),
    # no floats between 8 and 10**6: an integral one is a valid count (480.0 is 480), and a fuzzer that asks for
    # hundreds of tokens tests the machine's speed, not the server's input handling (it timed out a loaded CI run)
    st.floats(allow_nan=False, allow_infinity=False).filter(lambda x: not 8 < abs(x) < 10**6),
    st.booleans(),
)
_role = st.one_of(st.sampled_from(["system", "user", "assistant", "developer", "tool", "robot", ""]), _json)
_valid_message = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant"]), "content": st.text(max_size=60)}
)
_message = st.one_of(
    _valid_message,
    _valid_message,
    _valid_message,
    st.fixed_dictionaries({"role": _role, "content": st.one_of(st.text(max_size=60), _json)}),
    st.fixed_dictionaries(
        {
            "role": st.just("user"),
            "content": st.lists(
                st.fixed_dictionaries(
                    {"type": st.sampled_from(["text", "image_url", "x"]), "text": st.text(max_size=20)}
                ),
                max_size=3,
            ),
        }
    ),
    _json,
)
_sampling = {
    "temperature": _json | st.floats(min_value=-3, max_value=3),
    "top_p": _json | st.floats(min_value=-1, max_value=2),
    "top_k": st.integers(min_value=-(2**40), max_value=2**40) | _json,
    "min_p": _json,
    "presence_penalty": st.floats(min_value=-5, max_value=5),
    "frequency_penalty": _json,
    "repetition_penalty": st.floats(min_value=-1, max_value=20) | _json,
    "seed": st.integers(min_value=-(2**70), max_value=2**70) | _json,
    "stop": st.one_of(st.text(max_size=5), st.lists(st.text(max_size=5), max_size=20), _json),
    "stop_token_ids": st.lists(st.integers(min_value=-(2**40), max_value=2**40), max_size=5) | _json,
    "logprobs": _json,
    "top_logprobs": st.integers(min_value=-3, max_value=30) | _json,
    "stream": st.booleans() | _json,
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans() | _json}) | _json,
    "min_tokens": _small_count,
    "ignore_eos": st.booleans(),
    "echo": st.booleans() | _json,
    "logit_bias": _json,
    "response_format": _json,
    "tools": _json,
    "model": st.sampled_from(["smollm2", "gpt-4", ""]) | _json,
    "unknown_field": _json,
}


@st.composite
def _request(draw: st.DrawFn) -> tuple[str, Any]:
    kind = draw(st.sampled_from(["chat", "completion", "tokenize", "detokenize", "junk"]))
    if kind == "junk":
        return draw(st.sampled_from(["/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"])), draw(
            _json
        )
    if kind == "tokenize":
        return "/tokenize", draw(
            st.fixed_dictionaries(
                {},
                optional={
                    "prompt": _json | st.text(max_size=50),
                    "messages": st.lists(_message, max_size=3),
                    "add_special_tokens": _json,
                },
            )
        )
    if kind == "detokenize":
        return "/detokenize", {
            "tokens": draw(st.lists(st.integers(min_value=-(2**40), max_value=2**40), max_size=20) | _json)
        }
    body: dict[str, Any] = {"max_tokens": draw(_small_count), "n": draw(st.one_of(st.just(1), _small_count))}
    if kind == "chat":
        body["messages"] = draw(st.one_of(st.lists(_message, min_size=1, max_size=4), _json))
        if draw(st.booleans()):
            body["max_completion_tokens"] = draw(_small_count)
    else:
        body["prompt"] = draw(
            st.one_of(
                st.text(max_size=80),
                st.lists(st.integers(min_value=-5, max_value=60000), max_size=8),
                st.lists(st.text(max_size=10), max_size=3),
                _json,
            )
        )
    for key in draw(st.lists(st.sampled_from(sorted(_sampling)), max_size=4, unique=True)):
        body[key] = draw(_sampling[key])
    return ("/v1/chat/completions" if kind == "chat" else "/v1/completions"), body


@pytest.mark.timeout(600)
def test_hostile_requests_never_get_a_5xx(server: Any) -> None:
    seen: dict[int, int] = {}
    # A well-behaved client streams all along: bad requests must not hurt it.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        bystander = pool.submit(
            server.request,
            "POST",
            "/v1/completions",
            {"prompt": "Meanwhile,", "max_tokens": 24, "ignore_eos": True, "stream": True},
        )
        _fuzz(server, seen)
        status, _, raw = bystander.result(timeout=300)
    assert status == 200
    events = [e for e in raw.split(b"\n\n") if e]
    assert events[-1] == b"data: [DONE]"
    assert json.loads(events[-2][len(b"data: ") :])["choices"][0]["finish_reason"] == "length"
    print(f"statuses seen: {seen}")
    assert set(seen) - {200}, "the fuzzer produced no invalid requests"
    # Raw garbage on the wire, not even JSON.
    for junk in (b"\xff\xfe\x00", b"\x00" * 1000, b'{"messages": [' + b"{" * 5000, b"{}" * 1000):
        status, _, _ = server.request("POST", "/v1/chat/completions", junk)
        assert 400 <= status < 500
    # Still healthy, still serving.
    assert server.request("GET", "/health")[0] == 200
    status, _, raw = server.request("POST", "/v1/completions", {"prompt": "Hello", "max_tokens": 2})
    assert status == 200 and json.loads(raw)["usage"]["completion_tokens"] == 2
    server.wait_idle()


def _fuzz(server: Any, seen: dict[int, int]) -> None:

    @seed(SEED)
    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(_request())
    def one(req: tuple[str, Any]) -> None:
        path, body = req
        status, _, raw = server.request("POST", path, body, timeout=120)
        seen[status] = seen.get(status, 0) + 1
        assert status < 500, (path, body, raw[:500])
        if status != 200:
            doc = json.loads(raw)
            assert set(doc["error"]) == {"message", "type", "param", "code"}, doc

    one()

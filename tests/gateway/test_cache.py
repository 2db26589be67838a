"""The response cache's pure parts: which requests are deterministic, what the key ignores, the LRU-by-bytes
bound, expiry, the replay's event boundaries, and a capture that outgrows its limit."""

from __future__ import annotations

import pytest

from kubellm.gateway.cache import Capture, ResponseCache, cache_key

BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@pytest.mark.parametrize(
    ("extra", "cached"),
    [
        ({"temperature": 0}, True),
        ({"temperature": 0.0}, True),
        ({"temperature": 0.7, "seed": 3}, True),
        ({"seed": 0}, True),
        ({}, False),  # OpenAI's default temperature is 1
        ({"temperature": 0.7}, False),
        ({"temperature": False}, False),  # a bool is not a number here
        ({"temperature": 1, "seed": True}, False),
        ({"temperature": 1, "seed": "3"}, False),
    ],
)
def test_only_deterministic_requests_have_a_key(extra: dict[str, object], cached: bool) -> None:
    assert (cache_key("m", "/v1/chat/completions", {**BODY, **extra}) is not None) is cached


def test_the_key_is_the_normalized_request_of_one_model_and_path() -> None:
    key = cache_key("m", "/v1/chat/completions", {**BODY, "temperature": 0})
    reordered = dict(reversed(list({**BODY, "temperature": 0}.items())))
    assert cache_key("m", "/v1/chat/completions", reordered) == key
    assert cache_key("m", "/v1/chat/completions", {**BODY, "temperature": 0, "user": "alice"}) == key  # a label
    assert cache_key("other", "/v1/chat/completions", {**BODY, "temperature": 0}) != key
    assert cache_key("m", "/v1/completions", {**BODY, "temperature": 0}) != key
    assert cache_key("m", "/v1/chat/completions", {**BODY, "temperature": 0, "stream": True}) != key
    assert cache_key("m", "/v1/chat/completions", {**BODY, "temperature": 0, "max_tokens": 5}) != key


def test_lru_by_bytes_and_expiry() -> None:
    cache = ResponseCache(max_bytes=3 * (100 + 64 + 16), max_entry_bytes=10_000)
    ctype = "application/json"  # 16 bytes
    for name in "abc":
        assert cache.put(name, ctype, b"x" * 100, ttl_seconds=10, now=0)
    assert len(cache) == 3
    assert cache.get("a", now=1) is not None  # a is now the most recently used
    cache.put("d", ctype, b"y" * 100, ttl_seconds=10, now=1)
    assert cache.get("b", now=1) is None and cache.get("a", now=1) is not None  # b was the least recently used
    assert cache.bytes <= cache.max_bytes
    assert cache.get("a", now=10) is None  # expired (its TTL ran out at 10) and dropped
    assert len(cache) == 2
    assert not cache.put("huge", ctype, b"z" * 20_000, ttl_seconds=10)  # over max_entry_bytes: not kept


def test_a_stream_is_replayed_one_event_per_write() -> None:
    cache = ResponseCache(max_bytes=10_000, max_entry_bytes=10_000)
    body = b'data: {"a": 1}\n\ndata: {"b": 2}\n\ndata: [DONE]\n\n'
    cache.put("s", "text/event-stream; charset=utf-8", body, ttl_seconds=10)
    answer = cache.get("s")
    assert answer is not None
    assert answer.writes() == [b'data: {"a": 1}\n\n', b'data: {"b": 2}\n\n', b"data: [DONE]\n\n"]
    cache.put("j", "application/json", b'{"x": 1}', ttl_seconds=10)
    answer = cache.get("j")
    assert answer is not None and answer.writes() == [b'{"x": 1}']


def test_a_capture_over_its_limit_keeps_nothing() -> None:
    capture = Capture("k", limit=10, ttl_seconds=1)
    capture.add(b"12345")
    assert not capture.overflowed and capture.parts == [b"12345"]
    capture.add(b"678901")
    assert capture.overflowed and capture.parts == []
    capture.add(b"x")
    assert capture.parts == []

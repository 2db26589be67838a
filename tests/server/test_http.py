"""Raw HTTP against the shared server: SSE framing byte by byte, error shapes and statuses, probes, tokenize."""

from __future__ import annotations

import http.client
import json
import re
from typing import Any

import pytest

MESSAGES = [{"role": "user", "content": "Hi"}]
_EVENT = re.compile(rb"data: ([^\n]+)\n\n")


def _raw_post(server: Any, path: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, dict, bytes]:
    """POST with http.client: the body comes back exactly as sent on the wire (chunked encoding removed)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def _events(body: bytes) -> list[bytes]:
    """Split an SSE body into its events, checking that nothing else is in it."""
    events = [m.group(1) for m in _EVENT.finditer(body)]
    assert b"".join(b"data: " + e + b"\n\n" for e in events) == body, f"stray bytes in the SSE body: {body!r}"
    return events


def _error(body: bytes) -> dict[str, Any]:
    doc = json.loads(body)
    assert set(doc) == {"error"}
    assert set(doc["error"]) == {"message", "type", "param", "code"}
    assert isinstance(doc["error"]["message"], str) and doc["error"]["message"]
    return dict(doc["error"])


def test_chat_sse_framing_byte_by_byte(server: Any) -> None:
    body = json.dumps(
        {
            "model": "smollm2",
            "messages": MESSAGES,
            "max_tokens": 5,
            "temperature": 0,
            "n": 2,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    ).encode()
    status, headers, raw = _raw_post(server, "/v1/chat/completions", body)
    assert status == 200
    assert headers["content-type"].startswith("text/event-stream")
    events = _events(raw)
    assert events[-1] == b"[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    ids = {c["id"] for c in chunks}
    assert len(ids) == 1 and next(iter(ids)).startswith("chatcmpl-")
    for c in chunks:
        assert c["object"] == "chat.completion.chunk"
        assert c["model"] == "smollm2"
        assert isinstance(c["created"], int)
        assert "usage" in c
    # First a role chunk per choice, with empty content.
    assert [c["choices"][0]["delta"] for c in chunks[:2]] == [{"role": "assistant", "content": ""}] * 2
    assert [c["choices"][0]["index"] for c in chunks[:2]] == [0, 1]
    # Then content deltas; each choice ends with exactly one finish chunk whose delta is empty.
    body_chunks, usage_chunk = chunks[2:-1], chunks[-1]
    finishes = [ch for c in body_chunks for ch in c["choices"] if ch["finish_reason"] is not None]
    assert sorted(ch["index"] for ch in finishes) == [0, 1]
    assert all(ch["delta"] == {} and ch["finish_reason"] == "length" for ch in finishes)
    for c in body_chunks:
        assert len(c["choices"]) == 1 and c["usage"] is None
        ch = c["choices"][0]
        if ch["finish_reason"] is None:
            assert set(ch["delta"]) == {"content"} and ch["delta"]["content"]
    # Finally the usage chunk: no choices, the totals.
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["completion_tokens"] == 10
    assert usage_chunk["usage"]["total_tokens"] == usage_chunk["usage"]["prompt_tokens"] + 10


def test_completion_sse_framing_without_usage(server: Any) -> None:
    body = json.dumps({"prompt": "Hello", "max_tokens": 3, "temperature": 0, "stream": True}).encode()
    status, _, raw = _raw_post(server, "/v1/completions", body)
    assert status == 200
    events = _events(raw)
    assert events[-1] == b"[DONE]" and events.count(b"[DONE]") == 1
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "text_completion" and "usage" not in c for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        ("/v1/chat/completions", {"messages": MESSAGES, "temperature": -1}, 400, "temperature"),
        ("/v1/chat/completions", {"messages": MESSAGES, "top_p": 0}, 400, "top_p"),
        ("/v1/chat/completions", {"messages": MESSAGES, "n": 0}, 400, "n"),
        ("/v1/chat/completions", {"messages": MESSAGES, "top_logprobs": 3}, 400, "top_logprobs"),
        ("/v1/chat/completions", {"messages": MESSAGES, "logit_bias": {"1": 500}}, 400, "logit_bias"),
        ("/v1/chat/completions", {"messages": []}, 400, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.0.role"),
        ("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 100000}, 400, "max_tokens"),
        ("/v1/chat/completions", {}, 422, "messages"),
        ("/v1/chat/completions", {"messages": "hello"}, 422, "messages"),
        ("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": "many"}, 422, "max_tokens"),
        ("/v1/completions", {"prompt": "x", "stop": [""]}, 400, "stop"),
        ("/v1/completions", {"prompt": [5, 10**9]}, 400, "prompt"),
        ("/v1/completions", {"prompt": "x", "logprobs": 21}, 400, "logprobs"),
        ("/v1/completions", {"prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options"),
        ("/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404, "model"),
        ("/v1/completions", {"prompt": []}, 400, "prompt"),
    ],
)
def test_error_shape_and_status(server: Any, path: str, body: dict[str, Any], status: int, param: str) -> None:
    got, _, raw = server.request("POST", path, body)
    assert got == status, raw
    err = _error(raw)
    assert err["param"] == param, err


def test_prompt_longer_than_the_context_names_the_numbers(server: Any) -> None:
    prompt = "hello " * 1200  # > 1024 tokens, the server's --max-model-len
    status, _, raw = server.request("POST", "/v1/completions", {"prompt": prompt, "max_tokens": 1})
    assert status == 400
    err = _error(raw)
    assert err["code"] == "context_length_exceeded"
    assert "1024" in err["message"] and re.search(r"\b1[12]\d\d\b", err["message"]), err["message"]


def test_invalid_json_body_is_400(server: Any) -> None:
    for body in (b"{not json", b"", b"NaN", b'{"prompt": NaN}', b"[" * 100000):
        status, _, raw = _raw_post(server, "/v1/completions", body)
        assert status == 400, (body[:20], raw)
        _error(raw)


def test_non_object_body_is_422(server: Any) -> None:
    status, _, raw = _raw_post(server, "/v1/completions", b"[1, 2]")
    assert status == 422
    _error(raw)


def test_body_over_the_limit_is_413(server: Any) -> None:
    big = json.dumps({"prompt": "x" * (3 * 1024 * 1024)}).encode()  # the default limit is 2 MiB
    status, _, raw = _raw_post(server, "/v1/completions", big)
    assert status == 413
    _error(raw)


def test_unknown_route_and_method(server: Any) -> None:
    status, _, raw = server.request("GET", "/v1/nothing-here")
    assert status == 404
    _error(raw)
    status, _, raw = server.request("GET", "/v1/completions")
    assert status == 405
    _error(raw)


def test_probes(server: Any) -> None:
    assert server.request("GET", "/health")[0] == 200
    status, _, raw = server.request("GET", "/ready")
    assert status == 200 and json.loads(raw) == {"status": "ready"}


def test_tokenize_detokenize_round_trip(server: Any, tokenizer: Any) -> None:
    text = "Kubernetes runs pods. 🚀"
    status, _, raw = server.request("POST", "/tokenize", {"prompt": text, "return_token_strs": True})
    assert status == 200
    doc = json.loads(raw)
    assert doc["tokens"] == tokenizer.encode(text)
    assert doc["count"] == len(doc["tokens"]) and doc["max_model_len"] == 1024
    assert len(doc["token_strs"]) == doc["count"]
    status, _, raw = server.request("POST", "/detokenize", {"tokens": doc["tokens"]})
    assert status == 200 and json.loads(raw)["prompt"] == tokenizer.decode(doc["tokens"])
    status, _, raw = server.request("POST", "/tokenize", {"prompt": "x", "messages": MESSAGES})
    assert status == 400
    status, _, raw = server.request("POST", "/detokenize", {"tokens": [10**8]})
    assert status == 400 and _error(raw)["param"] == "tokens"


def test_openapi_describes_the_served_routes(server: Any) -> None:
    status, _, raw = server.request("GET", "/openapi.json")
    assert status == 200
    doc = json.loads(raw)
    assert doc["openapi"].startswith("3.")
    paths = doc["paths"]
    for path in (
        "/v1/completions",
        "/v1/chat/completions",
        "/v1/models",
        "/tokenize",
        "/detokenize",
        "/health",
        "/ready",
        "/metrics",
        "/v1/chat/completions/ws",
    ):
        assert path in paths
    chat_schema = paths["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    name = chat_schema["$ref"].rsplit("/", 1)[1]
    assert "messages" in doc["components"]["schemas"][name]["properties"]
    # Every documented GET route answers something other than 404 on the real server.
    for path, ops in paths.items():
        if "get" in ops and "{" not in path and not path.endswith("/ws"):
            assert server.request("GET", path)[0] != 404, path

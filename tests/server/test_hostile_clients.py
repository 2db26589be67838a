"""Hostile clients beyond test_fuzz.py's request bodies (issue #17): every route that /openapi.json lists fed junk
(hypothesis-drawn bodies, invalid UTF-8, deep nesting, odd path parameters), a huge n x max_tokens request
abandoned mid-way, and slow-loris clients trickling headers and bodies. Never a 5xx, never a crash; the event loop
stays responsive (a /health probe answers within a second throughout), memory stays bounded, and the engine ends
empty."""

from __future__ import annotations

import json
import random
import socket
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.slow

SEED = random.randrange(2**32)
print(f"test_hostile_clients: hypothesis seed {SEED}")
PROBE_LIMIT_S = 1.0

_junk_json = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=30)),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)
_junk_body = st.one_of(
    _junk_json.map(lambda doc: json.dumps(doc).encode()),
    st.binary(max_size=200),  # mostly invalid UTF-8
    st.integers(min_value=100, max_value=20000).map(lambda depth: b"[" * depth + b"]" * depth),  # deep nesting
    st.integers(min_value=100, max_value=20000).map(lambda depth: b'{"a":' * depth + b"1" + b"}" * depth),
    st.just(b'{"model": "smollm2", "prompt": "\xff\xfe\xfd", "max_tokens": 1}'),
    st.just(b'{"model": "smollm2", "messages": [{"role": "user", "content": "\\ud800"}], "max_tokens": 1}'),
)
_path_param = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["..", "../../etc/passwd", "%00", "smollm2/../x", "a" * 5000, "🚀", "smollm2"]),
)


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


class Probe:
    """GET /health every 50 ms on a thread; records the slowest answer (a stalled event loop shows here)."""

    def __init__(self, server: Any) -> None:
        self.server = server
        self.slowest = 0.0
        self.failures: list[Any] = []
        self.count = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            start = time.monotonic()
            status = self.server.get_status("/health")
            elapsed = time.monotonic() - start
            self.slowest = max(self.slowest, elapsed)
            self.count += 1
            if status != 200:
                self.failures.append(status)

    def __enter__(self) -> Probe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        assert self.count > 0
        assert not self.failures, self.failures
        assert self.slowest < PROBE_LIMIT_S, f"/health took {self.slowest:.2f} s"


def _routes(server: Any) -> list[tuple[str, str]]:
    status, _, raw = server.request("GET", "/openapi.json")
    assert status == 200
    doc = json.loads(raw)
    routes = [(method.upper(), path) for path, item in doc["paths"].items() for method in item]
    assert ("POST", "/v1/chat/completions") in routes and ("GET", "/v1/models/{model}") in routes, routes
    return routes


def _check(status: int, raw: bytes, what: Any) -> None:
    assert status < 500, (what, raw[:300])
    if 400 <= status < 500 and raw[:1] == b"{":
        error = json.loads(raw)["error"]
        assert set(error) == {"message", "type", "param", "code"}, error


def test_every_route_in_the_openapi_document_refuses_junk(server: Any) -> None:
    routes = _routes(server)
    seen: dict[int, int] = {}

    @seed(SEED)
    @settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(st.sampled_from(routes), _junk_body, _path_param)
    def one(route: tuple[str, str], body: bytes, param: str) -> None:
        method, path = route
        path = path.replace("{model}", urllib.parse.quote(param, safe=""))
        status, _, raw = server.request(method, path, body if method == "POST" else None, timeout=120)
        seen[status] = seen.get(status, 0) + 1
        _check(status, raw, (method, path, body[:200]))

    with Probe(server):
        one()
    print(f"statuses seen: {seen}")
    assert any(400 <= s < 500 for s in seen), seen
    server.wait_idle()


def test_an_unpaired_surrogate_escape_is_a_400_naming_the_field(server: Any) -> None:
    """JSON may escape a lone UTF-16 surrogate; Python keeps it in the str and the tokenizer cannot take it (this
    was a 500). A proper pair (an emoji) is one character and serves."""
    cases = [
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi \\ud800"}], "max_tokens": 1}',
         "messages.0.content"),
        ("/v1/completions", b'{"prompt": "\\udfff", "max_tokens": 1}', "prompt"),
        ("/v1/completions", b'{"prompt": "x", "max_tokens": 1, "stop": ["\\udbff"]}', "stop.0"),
        ("/tokenize", b'{"prompt": "a\\ud83d"}', "prompt"),
    ]  # fmt: skip
    for path, body, param in cases:
        status, _, raw = server.request("POST", path, body)
        assert status == 400, (path, body, raw)
        error = json.loads(raw)["error"]
        assert error["param"] == param and error["code"] == "invalid_unicode", error
    status, _, raw = server.request("POST", "/v1/completions", b'{"prompt": "\\ud83d\\ude80", "max_tokens": 1}')
    assert status == 200, raw


def test_a_huge_n_times_max_tokens_request_abandoned_mid_way(server: Any) -> None:
    """n = 64 x 900 tokens: allowed (n fits max_num_seqs, the tokens the context), and far more than the cache
    holds at once: the engine preempts rather than fails, and the client that leaves frees everything."""
    body = json.dumps(
        {"model": "smollm2", "prompt": "Once", "n": 64, "max_tokens": 900, "ignore_eos": True, "stream": True}
    ).encode()
    pid = server.proc.pid
    before = _rss_mib(pid)
    with Probe(server), socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:
        head = (
            f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        sock.sendall(head + body)
        received = b""
        while received.count(b"data: ") < 64 * 3:  # a few tokens of every choice
            chunk = sock.recv(65536)
            assert chunk, received[-500:]
            received += chunk
        assert received.startswith(b"HTTP/1.1 200"), received[:300]
    server.wait_idle()
    assert _rss_mib(pid) - before < 256, (before, _rss_mib(pid))


def test_slow_loris_clients_do_not_stall_the_server(server: Any) -> None:
    """64 connections that trickle: half send their headers a byte at a time, half promise a body and send it a
    byte at a time. Meanwhile the probe answers within a second and a real request is served."""
    pid = server.proc.pid
    before = _rss_mib(pid)
    header = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    promised = header + b"Content-Length: 100000\r\n\r\n" + b'{"prompt": "' + b"a" * 500
    slow: list[tuple[socket.socket, bytes]] = []
    try:
        for i in range(64):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            payload = header if i % 2 == 0 else promised
            slow.append((sock, payload))
        with Probe(server):
            for position in range(40):  # 40 rounds of one byte each, 20 ms apart: about a second of trickle
                for sock, payload in slow:
                    if position < len(payload):
                        sock.sendall(payload[position : position + 1])
                time.sleep(0.02)
            status, _, raw = server.request("POST", "/v1/completions", {"prompt": "Hello", "max_tokens": 2})
            assert status == 200 and json.loads(raw)["usage"]["completion_tokens"] == 2
    finally:
        for sock, _ in slow:
            sock.close()
    server.wait_idle()
    assert _rss_mib(pid) - before < 64, (before, _rss_mib(pid))

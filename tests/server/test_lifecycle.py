"""Flags that need a server of their own: API keys, a tiny queue (429), per-key rate limits, SIGTERM drain.

One small server serves the whole module (max_num_seqs 1, a queue of 1, keys from the flag, a file and the
environment); the drain test runs last because it ends the process.
"""

from __future__ import annotations

import http.client
import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow

KEY_FLAG, KEY_FILE, KEY_ENV, KEY_LIMITED = "sk-flag-1234", "sk-file-5678", "sk-env-9012", "sk-limited-3456"
RPM = 4


@pytest.fixture(scope="module")
def small_server(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Any]:
    key_file = Path(tmp_path_factory.mktemp("keys")) / "keys.txt"
    key_file.write_text(f"# API keys\n{KEY_FILE}\n\n{KEY_LIMITED}\n")
    spawn = request.getfixturevalue("spawn_server")
    yield spawn(
        "--api-key",
        KEY_FLAG,
        "--api-key-file",
        str(key_file),
        "--max-num-seqs",
        "1",
        "--max-queue-len",
        "1",
        "--rate-limit-rpm",
        str(RPM),
        "--drain-timeout",
        "8",
        env={"KUBELLM_API_KEYS": f" {KEY_ENV} ,"},
    )


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


class _Stream:
    """A streaming request read chunk by chunk over its own connection."""

    def __init__(self, server: Any, body: dict[str, Any], key: str) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
        self.conn.request(
            "POST",
            "/v1/completions",
            body=json.dumps({**body, "stream": True}),
            headers={"Content-Type": "application/json", **_auth(key)},
        )
        self.response = self.conn.getresponse()

    def next_event(self) -> bytes:
        line = b""
        while not line.strip():
            line = self.response.readline()
            if not line:
                return b""
        return line.strip()

    def rest(self) -> list[bytes]:
        events = []
        while event := self.next_event():
            events.append(event)
        return events

    def close(self) -> None:
        self.conn.close()


def _wait_for(predicate: Any, timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_api_keys(small_server: Any) -> None:
    body = {"prompt": "Hi", "max_tokens": 1}
    status, headers, raw = small_server.request("POST", "/v1/completions", body)
    assert status == 401 and headers.get("WWW-Authenticate", "").startswith("Bearer")
    assert json.loads(raw)["error"]["type"] == "authentication_error"
    for bad in (
        {"Authorization": "Bearer sk-wrong"},
        {"Authorization": KEY_FLAG},
        {"Authorization": "Basic x"},
        {"Authorization": f"Bearer {KEY_FLAG}x"},
    ):
        assert small_server.request("GET", "/v1/models", headers=bad)[0] == 401
    for key in (KEY_FLAG, KEY_FILE, KEY_ENV):
        assert small_server.request("GET", "/v1/models", headers=_auth(key))[0] == 200, key
    # Probes and metrics need no key.
    for path in ("/health", "/ready", "/metrics"):
        assert small_server.request("GET", path)[0] == 200, path
    # The keys never reach the log.
    log = small_server.log_text()
    assert all(k not in log for k in (KEY_FLAG, KEY_FILE, KEY_ENV, KEY_LIMITED))


def test_full_queue_is_429_with_retry_after(small_server: Any) -> None:
    body = {"prompt": "Tell me a story.", "max_tokens": 300, "ignore_eos": True}
    running = _Stream(small_server, body, KEY_FLAG)
    waiting = None
    try:
        assert running.response.status == 200
        assert running.next_event().startswith(b"data: {")  # it is running: max_num_seqs is 1
        waiting = _Stream(small_server, body, KEY_FLAG)
        _wait_for(lambda: small_server.metric("vllm:num_requests_waiting") == 1, what="the second request to queue")
        status, headers, raw = small_server.request(
            "POST", "/v1/completions", {"prompt": "x", "max_tokens": 1}, headers=_auth(KEY_FLAG)
        )
        assert status == 429
        assert int(headers["Retry-After"]) >= 1
        assert json.loads(raw)["error"]["code"] == "queue_full"
    finally:
        running.close()
        if waiting is not None:
            waiting.close()
    small_server.wait_idle()


def test_rate_limit_per_key(small_server: Any) -> None:
    body = {"prompt": "Hi", "max_tokens": 1}
    for _ in range(RPM):
        assert small_server.request("POST", "/v1/completions", body, headers=_auth(KEY_LIMITED))[0] == 200
    status, headers, raw = small_server.request("POST", "/v1/completions", body, headers=_auth(KEY_LIMITED))
    assert status == 429 and json.loads(raw)["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= int(headers["Retry-After"]) <= 60
    # Another key has its own budget.
    assert small_server.request("POST", "/v1/completions", body, headers=_auth(KEY_ENV))[0] == 200


def test_sigterm_drains_in_flight_streams_then_exits_0(small_server: Any) -> None:
    """SIGTERM: /ready 503 at once, new requests 503, the running stream finishes; the queued one, which cannot
    finish within --drain-timeout, is aborted (its stream still ends cleanly); then exit 0."""
    short = _Stream(small_server, {"prompt": "Count:", "max_tokens": 6, "ignore_eos": True}, KEY_FLAG)
    long = None
    try:
        assert short.next_event().startswith(b"data: {")
        long = _Stream(small_server, {"prompt": "Story:", "max_tokens": 900, "ignore_eos": True}, KEY_FLAG)
        _wait_for(lambda: small_server.metric("vllm:num_requests_waiting") == 1, what="the long request to queue")
        small_server.proc.send_signal(signal.SIGTERM)
        _wait_for(lambda: small_server.get_status("/ready") == 503, 10, "/ready to turn 503")
        status, _, raw = small_server.request(
            "POST", "/v1/completions", {"prompt": "x", "max_tokens": 1}, headers=_auth(KEY_FLAG)
        )
        assert status == 503 and json.loads(raw)["error"]["code"] == "draining"
        assert small_server.proc.poll() is None, "exited before the in-flight stream finished"
        short_events = short.rest()
        long_events = long.rest()
    finally:
        short.close()
        if long is not None:
            long.close()
    for events, reason in ((short_events, "length"), (long_events, "abort")):
        assert events[-1] == b"data: [DONE]"
        assert json.loads(events[-2][len(b"data: ") :])["choices"][0]["finish_reason"] == reason
    assert small_server.proc.wait(60) == 0

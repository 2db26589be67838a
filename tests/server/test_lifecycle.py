"""Flags that need a server of their own: API keys, a tiny queue (429), per-key rate limits (the SIGTERM drain has
its module: test_drain.py).

One small server serves the whole module (max_num_seqs 1, a queue of 1, keys from the flag, a file and the
environment).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from server.sse_client import SSEStream

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
    running = SSEStream(small_server.port, body, _auth(KEY_FLAG))
    waiting = None
    try:
        assert running.response.status == 200
        assert running.next_event().startswith(b"data: {")  # it is running: max_num_seqs is 1
        waiting = SSEStream(small_server.port, body, _auth(KEY_FLAG))
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

"""`--rate-limit-tpm` over HTTP: a key's prompt and generated tokens count against its minute, a request is admitted
while the key is under the limit, the next one gets 429 with Retry-After, and another key has its own budget."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

pytestmark = pytest.mark.slow

TPM = 40
KEYS = ("sk-tpm-one-1234", "sk-tpm-two-5678")
BODY = {"prompt": "Hi", "max_tokens": 20, "ignore_eos": True, "temperature": 0}  # 20 + the prompt's tokens


@pytest.fixture(scope="module")
def tpm_server(spawn_server: Any) -> Iterator[Any]:
    yield spawn_server("--rate-limit-tpm", str(TPM), *(a for k in KEYS for a in ("--api-key", k)))


def call(server: Any, key: str, body: dict[str, Any] = BODY) -> tuple[int, dict[str, str], bytes]:
    return server.request("POST", "/v1/completions", body, headers={"Authorization": f"Bearer {key}"})


def test_tokens_per_minute_per_key(tpm_server: Any) -> None:
    one, two = KEYS
    status, _, raw = call(tpm_server, one)
    assert status == 200
    first = json.loads(raw)
    used = first["usage"]["total_tokens"]
    assert used == first["usage"]["prompt_tokens"] + 20 < TPM  # under the limit: the next is admitted
    status, _, raw = call(tpm_server, one, {**BODY, "stream": True})  # streamed tokens are charged too
    assert status == 200 and raw.rstrip().endswith(b"data: [DONE]")
    status, headers, raw = call(tpm_server, one)  # 2 x used >= TPM
    assert status == 429, raw
    assert json.loads(raw)["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= int(headers["Retry-After"]) <= 60
    assert call(tpm_server, two)[0] == 200  # its own minute

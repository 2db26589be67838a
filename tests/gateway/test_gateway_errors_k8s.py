"""Bad input at a real gateway process (against the real API server, no runtime needed): OpenAI-shaped 4xx errors
naming the field, never a 5xx; and the probes and metrics."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from e2e.gateway_process import GatewayProcess

pytestmark = pytest.mark.k8s


def _post(url: str, data: bytes) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_bad_requests_get_openai_errors_naming_the_field(k8s_cluster: Any, k8s_namespace: str, tmp_path: Path) -> None:
    gateway = GatewayProcess(k8s_namespace, k8s_cluster.env(), tmp_path / "gateway.log", "--max-body-bytes", "2000")
    try:
        gateway.start()
        chat = f"{gateway.url}/v1/chat/completions"
        cases = [
            (b"{not json", 400, None),
            (b"[1, 2]", 400, None),
            (json.dumps({"messages": []}).encode(), 400, "model"),
            (json.dumps({"model": 7, "messages": []}).encode(), 400, "model"),
            (json.dumps({"model": "nope", "messages": []}).encode(), 404, "model"),
            (json.dumps({"model": "nope", "prompt": "x" * 5000}).encode(), 413, None),
        ]
        for data, status, param in cases:
            code, body = _post(chat, data)
            assert code == status, (data[:40], code, body)
            error = body["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["message"], body
            assert error["param"] == param, body
        assert "Known models: none" in _post(chat, json.dumps({"model": "nope"}).encode())[1]["error"]["message"]
        code, body = _post(f"{gateway.url}/v1/nowhere", b"{}")
        assert code == 404 and "error" in body
        with urllib.request.urlopen(f"{gateway.url}/v1/models", timeout=5) as r:
            assert json.load(r) == {"object": "list", "data": []}
        for probe in ("/healthz", "/ready"):
            with urllib.request.urlopen(gateway.url + probe, timeout=5) as r:
                assert r.status == 200
        assert gateway.metric("kubellm_gateway_requests_total", code="400") == 4
        # One JSON log line per request, naming its status.
        lines = [json.loads(line) for line in gateway.log_tail(100_000).splitlines() if line.startswith("{")]
        assert sorted(line["status"] for line in lines) == [400] * 4 + [404] * 2 + [413]
    finally:
        gateway.stop()

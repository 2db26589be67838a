"""The gateway's response cache end to end (issue #16): an LLMDeployment with `routing.responseCache` on, a real
runtime and a real gateway. A deterministic request asked again (the same body written differently) is answered
by the gateway alone: same bytes, `x-kubellm-cache: hit`, and the runtime's request counter does not move; a stream
is replayed event for event; a request that may differ each time (temperature > 0, no seed) is never cached."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from e2e.gateway_harness import create_llmd, harness, llmd_spec, runtime_successes, served_models
from e2e.operator_process import OperatorProcess

pytestmark = [pytest.mark.k8s, pytest.mark.slow]

CHAT = {"model": "cached-chat", "messages": [{"role": "user", "content": "Name three rivers."}], "max_tokens": 12}


def _post(url: str, raw: bytes) -> tuple[dict[str, str], bytes]:
    request = urllib.request.Request(url, data=raw, headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=120) as r:
        assert r.status == 200
        return {k.lower(): v for k, v in r.headers.items()}, r.read()


def test_deterministic_answers_are_served_from_the_cache(
    k8s_cluster: Any, k8s_namespace: str, run_tag: str, e2e_operator: OperatorProcess, tmp_path: Path
) -> None:
    ns = k8s_namespace
    spec = llmd_spec("cached-chat", routing={"responseCache": {"enabled": True, "ttlSeconds": 600}})
    with harness(k8s_cluster, ns, run_tag, e2e_operator, tmp_path, ["cached"]) as (h, api):
        create_llmd(api, ns, "cached", spec)
        h.wait(lambda: "cached-chat" in served_models(h.gateway), 60, "the model in /v1/models")
        (pod,) = h.wait(lambda: h.kubelets[0].serving(), 240, "the runtime to serve")
        url = f"{h.gateway.url}/v1/chat/completions"

        def served() -> float:
            return runtime_successes(pod.url("/metrics"))

        def ask(body: dict[str, Any], *, compact: bool = False) -> tuple[dict[str, str], bytes]:
            raw = json.dumps(body, separators=(",", ":") if compact else None, sort_keys=compact).encode()
            return _post(url, raw)

        # greedy, not streamed: the first is forwarded and stored, the second (keys reordered, no spaces) is not
        before = served()
        headers, first = ask({**CHAT, "temperature": 0})
        assert headers["x-kubellm-cache"] == "miss" and "x-kubellm-replica" in headers
        h.wait(lambda: served() == before + 1, 10, "the runtime to count the first request")
        headers, second = ask({**CHAT, "temperature": 0}, compact=True)
        assert headers["x-kubellm-cache"] == "hit" and "x-kubellm-replica" not in headers
        assert second == first

        # streamed: replayed event for event, [DONE] last
        stream = {**CHAT, "temperature": 0, "stream": True}
        headers, first_stream = ask(stream)
        assert headers["x-kubellm-cache"] == "miss"
        h.wait(lambda: served() == before + 2, 10, "the runtime to count the stream")
        headers, replayed = ask(stream)
        assert headers["x-kubellm-cache"] == "hit" and headers["content-type"].startswith("text/event-stream")
        assert replayed == first_stream and replayed.rstrip().endswith(b"data: [DONE]")

        # a fixed seed is deterministic too; temperature > 0 without one never is
        seeded = {**CHAT, "temperature": 0.9, "seed": 11}
        assert ask(seeded)[0]["x-kubellm-cache"] == "miss"
        assert ask(seeded)[0]["x-kubellm-cache"] == "hit"
        for _ in range(2):
            headers, _ = ask({**CHAT, "temperature": 0.9})
            assert "x-kubellm-cache" not in headers
        # the runtime saw the three misses and both free requests, and none of the three hits
        h.wait(lambda: served() == before + 5, 10, "the runtime to count the requests it served")
        assert served() == before + 5
        assert h.gateway.metric("kubellm_gateway_cache_requests_total", model_name="cached-chat", result="hit") == 3
        assert h.gateway.metric("kubellm_gateway_cache_requests_total", model_name="cached-chat", result="miss") == 3
        assert h.gateway.metric("kubellm_gateway_cache_bytes") > 0

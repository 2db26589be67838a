"""API keys and per-key rate limits at the gateway, through the real gateway app over loopback HTTP; a small HTTP
server stands in for the runtime (what is tested is the gateway's gate, not the model), answering with the usage a
runtime reports."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from kubellm.apikeys import key_id
from kubellm.gateway.access import RELOAD_CHECK_SECONDS, Access
from kubellm.gateway.app import Gateway, build_app
from kubellm.gateway.route import features
from kubellm.gateway.settings import GatewaySettings

pytestmark = pytest.mark.asyncio(loop_scope="session")

COMPLETION_TOKENS = 40


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def _runtime(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    usage = {"prompt_tokens": 3, "completion_tokens": COMPLETION_TOKENS, "total_tokens": 3 + COMPLETION_TOKENS}
    if body.get("stream"):
        out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await out.prepare(request)
        for _ in range(5):  # five content events, no usage chunk
            await out.write(b'data: {"choices": [{"delta": {"content": "x"}}]}\n\n')
        await out.write(b"data: [DONE]\n\n")
        return out
    return web.json_response({"model": body["model"], "choices": [], "usage": usage})


async def _serve(app: web.Application) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]


@pytest.fixture
async def make_gateway(tmp_path: Path) -> AsyncIterator[Any]:
    runtime = web.Application()
    runtime.router.add_post("/v1/chat/completions", _runtime)
    runtime_runner, runtime_port = await _serve(runtime)
    runners = [runtime_runner]

    async def make(keys: list[str], rpm: int = 0, tpm: int = 0) -> tuple[str, Path, Clock, Gateway]:
        key_file = tmp_path / "keys"
        key_file.write_text("# one per line\n" + "\n".join(keys) + "\n")
        gw = Gateway(GatewaySettings(api_key_file=str(key_file), rate_limit_rpm=rpm, rate_limit_tpm=tpm), kube=None)
        clock = Clock()
        gw.access = Access(str(key_file), rpm, tpm, environ={}, clock=clock)
        spec = {"model": {"source": "builtin:x", "servedModelName": "m"}, "replicas": 1}
        gw.registry.model_event("ADDED", {"metadata": {"name": "m", "namespace": "a"}, "spec": spec})
        pod = {
            "metadata": {"name": "m-0", "namespace": "a", "labels": {"app.kubernetes.io/instance": "m"}},
            "spec": {"containers": [{"name": "runtime", "ports": [{"name": "http", "containerPort": runtime_port}]}]},
            "status": {"podIP": "127.0.0.1", "conditions": [{"type": "Ready", "status": "True"}]},
        }
        gw.registry.pod_event("ADDED", pod)
        runner, port = await _serve(build_app(gw))
        runners.append(runner)
        return f"http://127.0.0.1:{port}", key_file, clock, gw

    yield make
    for runner in reversed(runners):
        await runner.cleanup()


async def _call(url: str, key: str | None, path: str = "/v1/chat/completions", **extra: Any) -> tuple[int, Any, Any]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    body = {"model": "m", "messages": [{"role": "user", "content": "hello there"}], **extra}
    async with aiohttp.ClientSession() as session:
        if path == "/v1/chat/completions":
            request = session.post(url + path, json=body, headers=headers)
        else:
            request = session.get(url + path, headers=headers)
        async with request as r:
            text = await r.text()
            try:
                data = json.loads(text)
            except ValueError:
                data = text
            return r.status, r.headers, data


async def test_keys_from_a_file_guard_everything_but_the_probes(make_gateway: Any) -> None:
    url, _, _, _ = await make_gateway(["sk-one", "sk-two"])
    for key in (None, "sk-three", "sk-on"):
        status, headers, data = await _call(url, key)
        assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer")
        assert data["error"]["code"] == "invalid_api_key" and set(data["error"]) == {"message", "type", "param", "code"}
    assert (await _call(url, None, "/v1/models"))[0] == 401
    for key in ("sk-one", "sk-two"):
        assert (await _call(url, key))[0] == 200
        assert (await _call(url, key, "/v1/models"))[0] == 200
    for open_path in ("/healthz", "/metrics"):
        assert (await _call(url, None, open_path))[0] == 200, open_path


async def test_a_changed_key_file_is_read_again(make_gateway: Any) -> None:
    url, key_file, clock, _ = await make_gateway(["sk-old"])
    assert (await _call(url, "sk-old"))[0] == 200
    key_file.write_text("sk-new\n")  # a Secret updated under the mount
    clock.now += RELOAD_CHECK_SECONDS
    assert (await _call(url, "sk-old"))[0] == 401
    assert (await _call(url, "sk-new"))[0] == 200
    key_file.write_text("")  # gone mid-swap, or emptied: the file says no keys, and auth is then off as configured
    clock.now += RELOAD_CHECK_SECONDS
    assert (await _call(url, None))[0] == 200


async def test_requests_per_minute_per_key(make_gateway: Any) -> None:
    url, _, clock, _ = await make_gateway(["sk-a", "sk-b"], rpm=2)
    assert [(await _call(url, "sk-a"))[0] for _ in range(2)] == [200, 200]
    status, headers, data = await _call(url, "sk-a")
    assert status == 429 and data["error"]["code"] == "rate_limit_exceeded"
    assert key_id("sk-a") in data["error"]["message"] and "sk-a" not in data["error"]["message"]  # the id, not the key
    assert 1 <= int(headers["Retry-After"]) <= 60
    assert (await _call(url, "sk-b"))[0] == 200  # its own budget
    clock.now += 60
    assert (await _call(url, "sk-a"))[0] == 200  # the window moved on


async def test_tokens_per_minute_count_the_answers_usage(make_gateway: Any) -> None:
    url, _, clock, gw = await make_gateway(["sk-a"], tpm=COMPLETION_TOKENS)
    assert (await _call(url, "sk-a", max_tokens=COMPLETION_TOKENS))[0] == 200
    # charged: the prompt (estimated) and the 40 completion tokens of its usage: past the 40 allowed
    status, _, data = await _call(url, "sk-a")
    assert status == 429 and data["error"]["code"] == "rate_limit_exceeded"
    clock.now += 60
    # a stream without a usage chunk is charged one token per content event (5 here): room for more
    assert (await _call(url, "sk-a", stream=True))[0] == 200
    assert (await _call(url, "sk-a", stream=True))[0] == 200
    prompt = features("chat", {"messages": [{"role": "user", "content": "hello there"}]}).prompt_tokens
    charged = [n for _, n in gw.access.limiter._usage[key_id("sk-a")].tokens]
    assert charged == [prompt, 5, prompt, 5]  # each stream: its prompt on admission, its five events at the end

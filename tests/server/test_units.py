"""Pure pieces of the server, without a model: rate limits, API keys, the route table, error mapping, the CLI."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from pydantic import ValidationError

from kubellm.apikeys import APIKeyAuth, key_id, load_api_keys
from kubellm.ratelimit import RateLimiter
from kubellm.runtime.server import protocol as p
from kubellm.runtime.server.app import OpenAIServer, ServerSettings
from kubellm.runtime.server.cli import add_arguments
from kubellm.runtime.server.errors import from_validation_error
from kubellm.runtime.server.openapi import PUBLIC_PATHS, ROUTES, build_openapi


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_rate_limiter_requests_per_minute_slide() -> None:
    clock = Clock()
    rl = RateLimiter(requests_per_minute=2, clock=clock)
    assert rl.try_acquire("a", 0) is None
    clock.now += 10
    assert rl.try_acquire("a", 0) is None
    wait = rl.try_acquire("a", 0)
    assert wait == 50  # the first request leaves the window 60 s after it came
    assert rl.try_acquire("b", 0) is None  # another caller, another budget
    clock.now += 50
    assert rl.try_acquire("a", 0) is None


def test_rate_limiter_tokens_per_minute() -> None:
    clock = Clock()
    rl = RateLimiter(tokens_per_minute=100, clock=clock)
    assert rl.try_acquire("a", 60) is None
    rl.charge("a", 50)  # generated tokens, charged when the request ends
    clock.now += 30
    wait = rl.try_acquire("a", 10)
    assert wait == 30
    clock.now += 30
    assert rl.try_acquire("a", 10) is None


def test_rate_limiter_off() -> None:
    rl = RateLimiter()
    assert not rl.enabled
    assert all(rl.try_acquire("a", 10**9) is None for _ in range(1000))


def test_load_api_keys_from_every_source(tmp_path: Path) -> None:
    f = tmp_path / "keys"
    f.write_text("# comment\nk-file\n\n  k-file2  \n")
    keys = load_api_keys(["k-flag", "k-file"], str(f), environ={"KUBELLM_API_KEYS": "k-env1, k-env2,,"})
    assert keys == ["k-flag", "k-file", "k-file2", "k-env1", "k-env2"]
    assert load_api_keys([], None, environ={}) == []
    with pytest.raises(ValueError, match="api-key-file"):
        load_api_keys([], str(tmp_path / "missing"), environ={})


def test_api_key_auth() -> None:
    auth = APIKeyAuth(["alpha", "beta"], PUBLIC_PATHS)
    assert auth.enabled
    assert auth.authenticate("Bearer beta") == key_id("beta")
    assert auth.authenticate("bearer   alpha ") == key_id("alpha")
    for bad in (None, "", "Bearer", "Bearer ", "Bearer gamma", "Basic alpha", "alpha", "Bearer alph", "Bearer alphaa"):
        assert auth.authenticate(bad) is None, bad
    assert auth.is_exempt("/health") and auth.is_exempt("/metrics") and not auth.is_exempt("/v1/models")
    assert "alpha" not in key_id("alpha")
    assert APIKeyAuth([], PUBLIC_PATHS).is_exempt("/v1/completions")


def test_routes_registered_equal_routes_documented() -> None:
    app = OpenAIServer(ServerSettings(served_model_name="m")).build_app()
    registered = {(r.method, r.resource.canonical) for r in app.router.routes() if r.method != "HEAD"}
    documented = {(m.upper(), path) for path, ops in build_openapi()["paths"].items() for m in ops}
    assert registered == documented == {(r.method, r.path) for r in ROUTES}


def test_openapi_refs_resolve() -> None:
    doc = build_openapi()
    schemas = doc["components"]["schemas"]
    text = str(doc)
    import re

    for name in set(re.findall(r"#/components/schemas/(\w+)", text)):
        assert name in schemas, name


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"messages": [{"role": "user", "content": "x"}], "temperature": 3}, 400, "temperature"),
        ({"messages": [{"role": "user", "content": "x"}], "n": 1000}, 400, "n"),
        ({"messages": [{"role": "user", "content": "x"}], "stop": ["a"] * 17}, 400, "stop"),
        ({"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, 422, "temperature"),
        ({"messages": [{"role": "user"}], "max_tokens": 0}, 400, "max_tokens"),
        ({}, 422, "messages"),
    ],
)
def test_validation_errors_map_to_status_and_field(body: dict, status: int, param: str) -> None:
    with pytest.raises(ValidationError) as info:
        p.ChatCompletionRequest.model_validate(body)
    err = from_validation_error(info.value)
    assert (err.status, err.param) == (status, param)
    assert err.to_dict()["error"]["type"] == "invalid_request_error"


def test_server_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="max_queue_len"):
        ServerSettings(served_model_name="m", max_queue_len=0)
    with pytest.raises(ValueError, match="served_model_name"):
        ServerSettings(served_model_name="")


def test_cli_flags() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(
        [
            "--port",
            "9000",
            "--api-key",
            "a",
            "--api-key",
            "b",
            "--no-enable-prefix-caching",
            "--kv-cache-memory",
            "1000000",
            "--max-queue-len",
            "5",
            "--host",
            "0.0.0.0",
        ]
    )
    assert (args.port, args.api_key, args.enable_prefix_caching, args.kv_cache_memory) == (
        9000,
        ["a", "b"],
        False,
        1000000,
    )
    assert parser.parse_args([]).model == "builtin:smollm2-135m-instruct"
    for bad in (["--port", "70000"], ["--max-num-seqs", "0"], ["--dtype", "int3"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)

"""A real `kubellm serve --kv-cache-dtype int8` process on loopback: it starts (calibrating its scales), serves
completions and streamed chats through the official openai client, reports the cache dtype on
`vllm:cache_config_info` as vLLM does, and frees every KV block when the requests are done. A value it does not
know is refused at start-up, naming the flag."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable

import openai
from server.conftest import BASE_ARGS, ServerProcess


def test_an_int8_cache_serves_and_reports_its_dtype(spawn_server: Callable[..., ServerProcess]) -> None:
    server = spawn_server("--kv-cache-dtype", "int8", "--dtype", "float32")
    client = openai.OpenAI(base_url=server.url("/v1"), api_key="unused", max_retries=0, timeout=120)
    done = client.completions.create(
        model="smollm2", prompt="The capital of France is", max_tokens=12, temperature=0, seed=1
    )
    assert done.choices[0].finish_reason in ("stop", "length")
    assert done.choices[0].text.strip()
    assert done.usage is not None and 1 <= done.usage.completion_tokens <= 12
    pieces = [
        chunk.choices[0].delta.content or ""
        for chunk in client.chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": "Name three colors."}], max_tokens=16, stream=True
        )
        if chunk.choices
    ]
    assert "".join(pieces).strip()
    server.wait_idle()  # no request left, every KV block back
    metrics = server.metrics()
    ((labels, value),) = metrics["vllm:cache_config_info"]
    assert labels["cache_dtype"] == "int8" and value == 1.0
    assert labels["model_name"] == "smollm2" and int(labels["num_gpu_blocks"]) > 0


def test_an_unknown_cache_dtype_is_refused_naming_the_flag() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "kubellm.runtime.server.cli", *BASE_ARGS, "--kv-cache-dtype", "int4"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert "--kv-cache-dtype" in result.stderr and "invalid choice: 'int4'" in result.stderr

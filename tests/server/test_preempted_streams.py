"""Preemption over HTTP: a server whose KV cache holds a fraction of what six concurrent greedy streams need
preempts some of them mid-stream and recomputes them; every stream's text is exactly what the same request
produces alone (nothing duplicated, nothing missing), and every KV block is free at the end."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest

pytestmark = pytest.mark.slow

# SmolLM2: 30 layers x 3 KV heads x 64 x 2 (K and V) x 16 tokens = 0.7 MiB a block in float32 (half in bfloat16):
# 12 (or 24) blocks. Six prompts of about 20 tokens fill 12 on admission; each grows to 5 blocks by 60 tokens.
KV_BYTES = 12 * 30 * 3 * 64 * 2 * 16 * 4
BODY = {"max_tokens": 60, "ignore_eos": True, "temperature": 0, "stream": True}


async def stream_text(session: aiohttp.ClientSession, url: str, prompt: str) -> str:
    parts = []
    async with session.post(url, json={"prompt": prompt, **BODY}) as r:
        assert r.status == 200, await r.text()
        async for line in r.content:
            if line.startswith(b"data: {"):
                parts += [c["text"] for c in json.loads(line[6:])["choices"]]
    return "".join(parts)


def test_preempted_streams_deliver_exactly_the_text_they_would_alone(spawn_server: Any) -> None:
    server = spawn_server("--kv-cache-memory", str(KV_BYTES), "--max-num-seqs", "8")
    prompts = [f"Here is a numbered list of facts about the planet number {i} in our solar system:" for i in range(6)]
    url = server.url("/v1/completions")

    async def run() -> tuple[list[str], list[str]]:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
            together = await asyncio.gather(*(stream_text(session, url, p) for p in prompts))
            alone = [await stream_text(session, url, p) for p in prompts]
        return list(together), alone

    before = server.metric("vllm:num_preemptions_total")
    together, alone = asyncio.run(run())
    assert server.metric("vllm:num_preemptions_total") > before, "the cache was large enough: nothing was preempted"
    assert together == alone
    server.wait_idle()

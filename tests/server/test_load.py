"""Many clients at once: concurrent streams complete, disconnecting clients free every KV block, and /metrics
carries the vLLM names with sane values under load."""

from __future__ import annotations

import asyncio
import json
import math
from typing import Any

import aiohttp
import pytest

pytestmark = pytest.mark.slow


async def _stream(session: aiohttp.ClientSession, url: str, i: int, **extra: Any) -> tuple[str, str, int]:
    body = {
        "messages": [{"role": "user", "content": f"Count to {i}."}],
        "max_tokens": 6,
        "temperature": 0.7,
        "seed": i,
        "stream": True,
        "stream_options": {"include_usage": True},
        **extra,
    }
    text, reason, usage = [], "", 0
    async with session.post(url + "/v1/chat/completions", json=body) as r:
        assert r.status == 200
        async for line in r.content:
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk["usage"]:
                usage = chunk["usage"]["completion_tokens"]
            for ch in chunk["choices"]:
                text.append(ch["delta"].get("content") or "")
                reason = ch["finish_reason"] or reason
    return "".join(text), reason, usage


async def test_fifty_concurrent_streams_complete_and_metrics_are_sane(server: Any) -> None:
    before = server.metrics()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
        results = await asyncio.gather(*(_stream(session, server.base, i) for i in range(50)))
        # A second wave, long enough to scrape while it runs: the scrape is taken once the engine reports it running.
        wave = [
            asyncio.create_task(_stream(session, server.base, i, max_tokens=200, ignore_eos=True)) for i in range(8)
        ]

        def busy() -> dict[str, Any] | None:
            samples = server.metrics()
            return samples if samples["vllm:num_requests_running"][0][1] > 0 else None

        under_load = None
        while under_load is None:
            assert not all(t.done() for t in wave), "the second wave ended before a scrape saw it running"
            under_load = await asyncio.to_thread(busy)
        await asyncio.gather(*wave)
    assert len(results) == 50
    for _text, reason, usage in results:
        assert reason in ("stop", "length")
        assert 1 <= usage <= 6
        assert reason == "stop" or usage == 6
    for name in ("vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc"):
        ((labels, value),) = under_load[name]
        assert labels == {"model_name": "smollm2"}
        assert value >= 0 and math.isfinite(value)
    assert 0.0 < under_load["vllm:kv_cache_usage_perc"][0][1] <= 1.0  # running sequences hold blocks
    ((labels, value),) = under_load["vllm:cache_config_info"]
    assert int(labels["block_size"]) == 16 and int(labels["num_gpu_blocks"]) > 0 and value == 1.0
    assert labels["cache_dtype"] == "auto"  # vLLM's label: the --kv-cache-dtype setting
    after = server.metrics()

    def total(samples: dict[str, Any], name: str, **labels: str) -> float:
        return sum(v for lab, v in samples.get(name, []) if all(lab.get(k) == x for k, x in labels.items()))

    generated = sum(u for _, _, u in results)
    assert total(after, "vllm:generation_tokens_total") - total(before, "vllm:generation_tokens_total") >= generated
    assert total(after, "vllm:prompt_tokens_total") > total(before, "vllm:prompt_tokens_total")
    finished = sum(
        total(after, "vllm:request_success_total", finished_reason=r)
        - total(before, "vllm:request_success_total", finished_reason=r)
        for r in ("stop", "length")
    )
    assert finished >= 58
    # the second wave's tokens count too: 8 x 200
    assert total(after, "vllm:generation_tokens_total") - total(before, "vllm:generation_tokens_total") >= (
        generated + 8 * 200
    )
    for hist in (
        "vllm:time_to_first_token_seconds",
        "vllm:e2e_request_latency_seconds",
        "vllm:inter_token_latency_seconds",
    ):
        count = total(after, hist + "_count") - total(before, hist + "_count")
        assert count >= 58 if hist != "vllm:inter_token_latency_seconds" else count > 0, hist
        assert total(after, hist + "_sum") > 0
    for counter in ("vllm:num_preemptions_total", "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total"):
        assert counter in after, f"{counter} missing from /metrics"
    queries = total(after, "vllm:prefix_cache_queries_total") - total(before, "vllm:prefix_cache_queries_total")
    hits = total(after, "vllm:prefix_cache_hits_total") - total(before, "vllm:prefix_cache_hits_total")
    assert 0 <= hits <= queries and queries > 0  # 58 prompts were looked up in the prefix cache
    await asyncio.to_thread(server.wait_idle)


async def test_clients_disconnecting_mid_stream_free_every_kv_block(server: Any) -> None:
    async def start_and_drop(session: aiohttp.ClientSession, i: int) -> None:
        body = {"prompt": f"Story number {i}: once upon a time", "max_tokens": 500, "ignore_eos": True, "stream": True}
        r = await session.post(server.url("/v1/completions"), json=body)
        assert r.status == 200
        seen = 0
        async for line in r.content:
            if line.startswith(b"data: {"):
                seen += 1
                if seen >= 2:
                    break
        r.close()  # drop the connection mid-stream

    def aborted() -> float:
        samples = server.metrics()["vllm:request_success_total"]
        return sum(v for lab, v in samples if lab["finished_reason"] == "abort")

    before = aborted()
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=300)) as session:
        await asyncio.gather(*(start_and_drop(session, i) for i in range(20)))
    await asyncio.to_thread(server.wait_idle, 60.0)
    assert aborted() - before == 20  # exactly these 20, counted once each

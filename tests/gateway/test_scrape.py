"""The scraper's reading of a runtime's /metrics, against prometheus_client's own parser as the oracle: on what the
runtime really renders, and on the corners of the text format (labels holding braces and spaces, timestamps, NaN,
names that extend the ones read)."""

from __future__ import annotations

import math
import random

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kubellm import contract
from kubellm.gateway.scrape import parse_load, samples
from kubellm.runtime.outputs import EngineStats
from kubellm.runtime.server.metrics import ServerMetrics

NAMES = (contract.METRIC_WAITING, contract.METRIC_KV_USAGE)


def oracle(text: str) -> list[tuple[str, str]]:
    return [
        (s.name, repr(float(s.value)))
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name in NAMES
    ]


def ours(text: str) -> list[tuple[str, str]]:
    return [(name, repr(value)) for name, value in samples(text, NAMES)]  # repr: NaN equals NaN


def test_reads_what_the_runtime_renders() -> None:
    seed = random.randrange(2**31)
    print(f"seed {seed}")
    rng = random.Random(seed)
    waiting, kv = rng.randrange(50), rng.random()
    metrics = ServerMetrics("chat", lambda: EngineStats(waiting, rng.randrange(8), kv, 1000, 16))
    for _ in range(100):
        metrics.ttft.observe(rng.random())
        metrics.http_request("/v1/chat/completions", rng.choice((200, 400, 429)))
    text = metrics.render().decode()
    assert ours(text) == oracle(text)
    load = parse_load(text, at=1.0)
    assert (load.waiting, load.kv_usage, load.at) == (waiting, kv, 1.0)


TRICKY = """# HELP vllm:num_requests_waiting Requests waiting.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{model_name="a } b",x="{"} 3.0
vllm:num_requests_waiting{model_name="c"} 4 1700000000000
vllm:num_requests_waiting_by_reason{reason="x"} 100
vllm:num_requests_waiting 2
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{model_name="a"} NaN
vllm:kv_cache_usage_perc{model_name="b"} 0.5
vllm:kv_cache_usage_perc{model_name="c"} +Inf
"""


def test_the_text_formats_corners() -> None:
    assert ours(TRICKY) == oracle(TRICKY)
    load = parse_load(TRICKY, at=0.0)
    assert load.waiting == 9  # the longer name is not counted
    assert load.kv_usage == math.inf  # NaN is skipped; +Inf counts, as the oracle reads it


def test_a_sample_without_a_value_is_an_error() -> None:
    with pytest.raises(ValueError, match="without a value"):
        parse_load('vllm:num_requests_waiting{model_name="a"}\n', at=0.0)

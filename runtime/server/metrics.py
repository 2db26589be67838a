"""Prometheus metrics at /metrics, named as vLLM names them (the Gateway API Inference Extension protocol).

Routers and autoscalers built for vLLM read ``vllm:num_requests_waiting``, ``vllm:kv_cache_usage_perc`` and
friends; keeping the names means they work unchanged. Engine-wide numbers (queue depth, KV usage,
preemptions, prefix-cache counters) are read from ``engine.stats()`` at scrape time by a collector;
per-request latencies and token counts are observed by the server as requests finish. Each app owns its own
registry, so two servers in one process (tests) never share counters.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ..outputs import EngineStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# The buckets vLLM uses, so dashboards built for it read these histograms the same way.
TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
    2560.0,
)
ITL_BUCKETS = (
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
E2E_BUCKETS = (
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
    1920.0,
    7680.0,
)


class _EngineStatsCollector(Collector):
    """Reads the engine's snapshot on every scrape; nothing to keep in sync between scrapes."""

    def __init__(self, model_name: str, stats: Callable[[], EngineStats | None]) -> None:
        self._model_name = model_name
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        stats = self._stats()
        if stats is None:  # still loading: report nothing rather than made-up zeros
            return
        labels = ["model_name"]
        value = [self._model_name]

        def gauge(name: str, doc: str, v: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=labels)
            g.add_metric(value, v)
            return g

        def counter(name: str, doc: str, v: float) -> CounterMetricFamily:
            c = CounterMetricFamily(name, doc, labels=labels)
            c.add_metric(value, v)
            return c

        yield gauge("vllm:num_requests_running", "Requests in the running batch.", stats.num_requests_running)
        yield gauge("vllm:num_requests_waiting", "Requests waiting to be scheduled.", stats.num_requests_waiting)
        yield gauge(
            "vllm:kv_cache_usage_perc", "Fraction of KV-cache blocks held by requests (1 = full).", stats.kv_cache_usage
        )
        info = GaugeMetricFamily(
            "vllm:cache_config_info",
            "KV-cache configuration.",
            labels=["model_name", "block_size", "num_gpu_blocks", "cache_dtype"],
        )
        info.add_metric([self._model_name, str(stats.block_size), str(stats.num_gpu_blocks), stats.cache_dtype], 1.0)
        yield info
        yield counter("vllm:num_preemptions", "Preemptions since start.", stats.num_preemptions)
        yield counter(
            "vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", stats.prefix_cache_queries
        )
        yield counter("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache.", stats.prefix_cache_hits)
        spec = stats.spec_decode
        if spec is not None:
            yield counter("vllm:spec_decode_num_drafts", "Sequence-steps that verified drafts.", spec.num_drafts)
            yield counter("vllm:spec_decode_num_draft_tokens", "Draft tokens verified.", spec.num_draft_tokens)
            yield counter("vllm:spec_decode_num_accepted_tokens", "Draft tokens accepted.", spec.num_accepted_tokens)
            per_pos = CounterMetricFamily(
                "vllm:spec_decode_num_accepted_tokens_per_pos",
                "Draft tokens accepted, by position in the draft.",
                labels=["model_name", "position"],
            )
            for pos, n in enumerate(spec.num_accepted_tokens_per_pos):
                per_pos.add_metric([self._model_name, str(pos)], n)
            yield per_pos


class ServerMetrics:
    """The server's metrics, in a registry of their own."""

    def __init__(self, model_name: str, stats: Callable[[], EngineStats | None]) -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_EngineStatsCollector(model_name, stats))
        labels = ["model_name"]

        def histogram(name: str, documentation: str, buckets: Sequence[float]) -> Any:
            return Histogram(name, documentation, labels, buckets=buckets, registry=self.registry).labels(model_name)

        def counter(name: str, documentation: str) -> Any:
            return Counter(name, documentation, labels, registry=self.registry).labels(model_name)

        self.ttft = histogram("vllm:time_to_first_token_seconds", "Time to first token.", TTFT_BUCKETS)
        self.itl = histogram("vllm:inter_token_latency_seconds", "Time between consecutive output tokens.", ITL_BUCKETS)
        self.e2e = histogram("vllm:e2e_request_latency_seconds", "End-to-end request latency.", E2E_BUCKETS)
        self.prompt_tokens = counter("vllm:prompt_tokens", "Prompt tokens processed.")
        self.generation_tokens = counter("vllm:generation_tokens", "Tokens generated.")
        self._success = Counter(
            "vllm:request_success",
            "Finished requests by finish reason.",
            ["model_name", "finished_reason"],
            registry=self.registry,
        )
        self._http = Counter(
            "kubellm:http_requests",
            "HTTP requests by route and status.",
            ["model_name", "route", "status"],
            registry=self.registry,
        )

    def request_finished(self, reason: str) -> None:
        self._success.labels(self.model_name, reason).inc()

    def http_request(self, route: str, status: int) -> None:
        self._http.labels(self.model_name, route, str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)

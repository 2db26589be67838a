"""The gateway's Prometheus metrics, in their own registry (GET /metrics)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from kubellm import contract


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "kubellm_gateway_requests",
            "Requests answered, by model and HTTP status.",
            ["model_name", "code"],
            registry=r,
        )
        self.added_latency = Histogram(
            "kubellm_gateway_added_latency_seconds",
            "Time from a request's arrival to its headers going upstream, holds excluded: parse, route, connect.",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0),
            registry=r,
        )
        self.decisions = Counter(
            "kubellm_gateway_routing_decisions",
            "Replica picks, by model, strategy and decision (owner, spill, unbounded, least_load).",
            ["model_name", "strategy", "decision"],
            registry=r,
        )
        self.held = Gauge(
            contract.METRIC_GATEWAY_HELD,
            "Requests held for a model with no ready replica (waiting load the runtimes cannot see).",
            ["namespace", "llmdeployment", "model_name"],
            registry=r,
        )
        self.hold_seconds = Histogram(
            "kubellm_gateway_hold_seconds",
            "How long requests were held before a replica was ready (or they gave up).",
            ["model_name"],
            buckets=(0.1, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600),
            registry=r,
        )
        self.rejected = Counter(
            "kubellm_gateway_hold_rejections",
            "Requests refused while holding: queue_full (429) or timeout (503).",
            ["model_name", "reason"],
            registry=r,
        )
        self.retries = Counter(
            "kubellm_gateway_upstream_retries",
            "Upstream attempts that failed before the first byte and were tried again (connect, unavailable; "
            "refused: a 429 from a route's tier, tried on the next tier).",
            ["model_name", "reason"],
            registry=r,
        )
        self.route_decisions = Counter(
            "kubellm_gateway_route_decisions",
            "Requests to an LLMRoute, by route (its model name), the tier that served (or was tried last) and reason: "
            "matched (the first tier whose rules hold), classified (the one the classifier chose among them) or "
            "fallback (a later tier, the chosen one unavailable or refusing).",
            ["route", "tier", "reason"],
            registry=r,
        )
        self.classifier_calls = Counter(
            "kubellm_gateway_route_classifier_calls",
            "Calls to a route's classifier, by route and outcome: chosen (it named a tier), unavailable (no ready "
            "replica), failed (an error, a timeout or an answer that is no tier's name).",
            ["route", "outcome"],
            registry=r,
        )
        self.cache_requests = Counter(
            "kubellm_gateway_cache_requests",
            "Deterministic requests to a model with the response cache on, by model and result (hit: answered from "
            "the cache, the runtime never saw it; miss: forwarded, and stored if it completed).",
            ["model_name", "result"],
            registry=r,
        )
        self.cache_bytes = Gauge("kubellm_gateway_cache_bytes", "Bytes held by the response cache.", registry=r)
        self.wakes = Counter(
            "kubellm_gateway_wakes", "Wake annotations set on a model at zero replicas.", ["model_name"], registry=r
        )

"""Serve one request to an LLMRoute: choose its tier (route.py; with a classifier and several tiers whose rules
hold, the classifier names one of them), then forward along the tiers from that one.

    chosen tier ─▶ forward(fall_through) ── None: no ready replica (woken if at zero) or a 429 ──▶ next tier ...
                                                                                                  last tier ─▶ forward
                                                                                                  (held and woken like
                                                                                                   a direct request)

A tier whose LLMDeployment does not exist is skipped. The request goes upstream naming the tier's served model;
the response says which tier and LLMDeployment answered (headers), the metrics count it (matched or fallback).
"""

from __future__ import annotations

import json
import logging
from typing import Any

import aiohttp
from aiohttp import web

from kubellm.gateway.balance import Strategy, prefix_key
from kubellm.gateway.discovery import Registry
from kubellm.gateway.errors import GatewayError
from kubellm.gateway.metrics import GatewayMetrics
from kubellm.gateway.proxy import Forwarder, RequestRecord
from kubellm.gateway.route import Features, Route, Tier, classifier_messages, request_kind

log = logging.getLogger("kubellm.gateway.tiers")
TIER_HEADER = "x-kubellm-route-tier"
DEPLOYMENT_HEADER = "x-kubellm-route-deployment"


def _no_tier(route: Route, f: Features) -> GatewayError:
    return GatewayError(
        400,
        f"the request matches no tier of {route.model!r} (about {f.prompt_tokens} prompt tokens, max tokens "
        f"{f.requested_tokens}, tools: {f.has_tools}) and the route has no default tier",
        param="model",
        code="no_matching_tier",
    )


async def classify(
    forwarder: Forwarder, registry: Registry, metrics: GatewayMetrics, route: Route, tiers: list[Tier], text: str
) -> int | None:
    """The index in `tiers` the route's classifier names; None when it is unavailable, fails or is slow (woken if at
    zero, for the requests after this one)."""
    assert route.classifier is not None
    model = registry.deployment(route.namespace, route.classifier.deployment)
    endpoints = forwarder.ready(model) if model is not None else []
    if model is None or not endpoints:
        if model is not None:
            await forwarder.waker.wake(model)
        metrics.classifier_calls.labels(route.model, "unavailable").inc()
        return None
    endpoint, _ = forwarder.pick(model, endpoints, None)
    names = [t.name for t in tiers]
    body = {
        "model": model.served_name,
        "messages": classifier_messages(route.classifier, tiers, text),
        "structured_outputs": {"choice": names},
        "max_tokens": 16,
        "temperature": 0,
    }
    timeout = aiohttp.ClientTimeout(total=route.classifier.timeout_seconds)
    try:
        # busy: the classifier's replicas are balanced on the same loads as the requests they serve
        url, headers = f"{endpoint.url}/v1/chat/completions", {"Accept-Encoding": "identity"}
        with forwarder.busy(endpoint):
            async with forwarder.session().post(url, json=body, timeout=timeout, headers=headers) as r:
                r.raise_for_status()
                answer = str((await r.json())["choices"][0]["message"]["content"]).strip()
        chosen = names.index(answer)
    except (aiohttp.ClientError, TimeoutError, LookupError, TypeError, ValueError) as exc:
        log.warning("the classifier of %s (%s) failed: %r; the rules decide", route.model, model.name, exc)
        metrics.classifier_calls.labels(route.model, "failed").inc()
        return None
    metrics.classifier_calls.labels(route.model, "chosen").inc()
    return chosen


async def serve_route(
    forwarder: Forwarder,
    registry: Registry,
    metrics: GatewayMetrics,
    request: web.Request,
    route: Route,
    request_body: tuple[dict[str, Any], Features],
    record: RequestRecord,
    prefix_chars: int,
) -> web.StreamResponse:
    """request_body: the parsed body and what the rules see of it (route.features of the body)."""
    body, request_features = request_body
    kind = request_kind(body)
    record.llm_route = route.model
    candidates = route.candidates(request_features)
    if not candidates:
        raise _no_tier(route, request_features)
    chosen, first = candidates[0], "matched"
    if route.classifier is not None and len(candidates) > 1:
        options = [route.tiers[i] for i in candidates]
        picked = await classify(forwarder, registry, metrics, route, options, request_features.last_user_text)
        if picked is not None:
            chosen, first = candidates[picked], "classified"
    tiers = [
        (i, tier, model)
        for i, tier in enumerate(route.tiers)
        if i >= chosen and (model := registry.deployment(route.namespace, tier.deployment)) is not None
    ]
    if not tiers:
        missing = ", ".join(t.deployment for t in route.tiers[chosen:])
        raise GatewayError(
            503,
            f"no tier of {route.model!r} can serve: LLMDeployment(s) {missing} not found in {route.namespace}",
            code="model_unavailable",
        )
    reason = first
    try:
        for n, (i, tier, model) in enumerate(tiers):
            record.tier, reason = tier.name, first if i == chosen else "fallback"
            record.headers = {TIER_HEADER: tier.name, DEPLOYMENT_HEADER: model.name}
            document = {**body, "model": model.served_name}
            upstream = (json.dumps(document).encode(), document)
            key = prefix_key(kind, body, prefix_chars) if model.strategy is Strategy.PREFIX_HASH else None
            last = n == len(tiers) - 1
            response = await forwarder.forward(request, model, upstream, key, record, fall_through=not last)
            if response is not None:
                return response
        raise AssertionError("the last tier is forwarded without fall_through: it answers")
    finally:
        metrics.route_decisions.labels(route.model, record.tier or "", reason).inc()

"""Serve one request to an LLMRoute: choose its tier (route.py), then forward along the tiers from that one.

    chosen tier ─▶ forward(fall_through) ── None: no ready replica (woken if at zero) or a 429 ──▶ next tier ...
                                                                                                  last tier ─▶ forward
                                                                                                  (held and woken like
                                                                                                   a direct request)

A tier whose LLMDeployment does not exist is skipped. The request goes upstream naming the tier's served model;
the response says which tier and LLMDeployment answered (headers), the metrics count it (matched or fallback).
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from kubellm.gateway.balance import Strategy, prefix_key
from kubellm.gateway.discovery import Registry
from kubellm.gateway.errors import GatewayError
from kubellm.gateway.metrics import GatewayMetrics
from kubellm.gateway.proxy import Forwarder, RequestRecord
from kubellm.gateway.route import Route, features

TIER_HEADER = "x-kubellm-route-tier"
DEPLOYMENT_HEADER = "x-kubellm-route-deployment"


def _no_tier(route: Route, kind: str, body: dict[str, Any]) -> GatewayError:
    f = features(kind, body)
    return GatewayError(
        400,
        f"the request matches no tier of {route.model!r} (about {f.prompt_tokens} prompt tokens, max tokens "
        f"{f.requested_tokens}, tools: {f.has_tools}) and the route has no default tier",
        param="model",
        code="no_matching_tier",
    )


async def serve_route(
    forwarder: Forwarder,
    registry: Registry,
    metrics: GatewayMetrics,
    request: web.Request,
    route: Route,
    body: dict[str, Any],
    record: RequestRecord,
    prefix_chars: int,
) -> web.StreamResponse:
    kind = "chat" if isinstance(body.get("messages"), list) else "completions"
    record.llm_route = route.model
    chosen = route.choose(features(kind, body))
    if chosen is None:
        raise _no_tier(route, kind, body)
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
    reason = "matched"
    try:
        for n, (i, tier, model) in enumerate(tiers):
            record.tier, reason = tier.name, "matched" if i == chosen else "fallback"
            record.headers = {TIER_HEADER: tier.name, DEPLOYMENT_HEADER: model.name}
            upstream = json.dumps({**body, "model": model.served_name}).encode()
            key = prefix_key(kind, body, prefix_chars) if model.strategy is Strategy.PREFIX_HASH else None
            last = n == len(tiers) - 1
            response = await forwarder.forward(request, model, upstream, key, record, fall_through=not last)
            if response is not None:
                return response
        raise AssertionError("the last tier is forwarded without fall_through: it answers")
    finally:
        metrics.route_decisions.labels(route.model, record.tier or "", reason).inc()

"""The gateway's HTTP app: the OpenAI routes (routed by their `model` field: an LLMDeployment's served name, or an
LLMRoute's virtual model, tiers.py), /v1/models, probes, /metrics, and one JSON log line per request. Startup wires
the watches, the load scraper and the forwarder."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from kubellm import contract
from kubellm.apikeys import ANONYMOUS
from kubellm.gateway.access import Access
from kubellm.gateway.balance import Strategy, prefix_key
from kubellm.gateway.discovery import RUNTIME_SELECTOR, Registry
from kubellm.gateway.errors import GatewayError
from kubellm.gateway.hold import Holds, Waker
from kubellm.gateway.kube import Informer, Kube
from kubellm.gateway.metrics import GatewayMetrics
from kubellm.gateway.proxy import Forwarder, RequestRecord
from kubellm.gateway.route import features, request_kind
from kubellm.gateway.scrape import LoadScraper
from kubellm.gateway.settings import GatewaySettings
from kubellm.gateway.tiers import serve_route
from kubellm.gateway.websocket import proxy_websocket

access_log = logging.getLogger("kubellm.gateway.access")
log = logging.getLogger("kubellm.gateway")

# path -> the prefix-key flavour; every one of them is routed by its body's `model`.
ROUTED = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completions",
    "/tokenize": "completions",
    "/detokenize": "completions",
}
LLMD_PATH = f"/apis/{contract.LLMD_GROUP}/{contract.LLMD_VERSION}"
CALLER = web.RequestKey("caller", str)  # the API key's id, set by the access middleware


@dataclass
class Gateway:
    settings: GatewaySettings
    kube: Kube | None
    registry: Registry = field(default_factory=Registry)
    metrics: GatewayMetrics = field(default_factory=GatewayMetrics)
    informers: list[Informer] = field(default_factory=list)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def __post_init__(self) -> None:
        s = self.settings
        self.scraper = LoadScraper(self.registry.all_endpoints, s.scrape_interval_seconds)
        self.holds = Holds(self.metrics, s.max_held_per_model, s.retry_after_seconds)
        self.waker = Waker(self.kube, self.metrics, self.holds, s.wake_interval_seconds, s.wake_gather_seconds)
        self.forwarder = Forwarder(s, self.registry, self.scraper, self.metrics, self.holds, self.waker)
        self.access = Access(s.api_key_file, s.rate_limit_rpm, s.rate_limit_tpm)

    def _informers(self, kube: Kube) -> list[Informer]:
        out = []
        for ns in self.settings.namespaces or (None,):
            scope = f"/namespaces/{ns}" if ns else ""
            out.append(
                Informer(
                    kube,
                    f"{LLMD_PATH}{scope}/{contract.LLMD_PLURAL}",
                    on_replace=lambda items, ns=ns: self.registry.replace_models(items, ns),
                    on_event=self.registry.model_event,
                    resync_seconds=self.settings.resync_seconds,
                )
            )
            out.append(
                Informer(
                    kube,
                    f"{LLMD_PATH}{scope}/{contract.LLMROUTE_PLURAL}",
                    on_replace=lambda items, ns=ns: self.registry.replace_routes(items, ns),
                    on_event=self.registry.route_event,
                    resync_seconds=self.settings.resync_seconds,
                    missing_ok=True,  # a cluster without the LLMRoute CRD: no routes, and the rest still serves
                )
            )
            out.append(
                Informer(
                    kube,
                    f"/api/v1{scope}/pods",
                    params={"labelSelector": RUNTIME_SELECTOR},
                    on_replace=lambda items, ns=ns: self.registry.replace_pods(items, ns),
                    on_event=self.registry.pod_event,
                    resync_seconds=self.settings.resync_seconds,
                )
            )
        return out

    async def start(self, _: web.Application) -> None:
        if self.kube is not None:
            self.informers = self._informers(self.kube)
        coros = [i.run() for i in self.informers] + [self.scraper.run()]
        self.tasks = [asyncio.create_task(c) for c in coros]

    async def stop(self, _: web.Application) -> None:
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.waker.close()
        await self.forwarder.close()
        if self.kube is not None:
            await self.kube.close()

    # -- routes -------------------------------------------------------------------------------------------------

    async def health(self, _: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def ready(self, _: web.Request) -> web.Response:
        synced = all(i.synced.is_set() for i in self.informers)
        return web.json_response({"ready": synced}, status=200 if synced else 503)

    async def prometheus(self, _: web.Request) -> web.Response:
        response = web.Response(body=generate_latest(self.metrics.registry))
        response.content_type = CONTENT_TYPE_LATEST.split(";")[0]
        return response

    def _model_card(self, served: str) -> dict[str, Any]:
        model = self.registry.by_served_name()[served]
        ready = len(self.registry.endpoints(model))
        return {
            "id": served,
            "object": "model",
            "created": 0,
            "owned_by": "kubellm",
            "kubellm": {
                "namespace": model.namespace,
                "llmdeployment": model.name,
                "ready_replicas": ready,
                "routing": model.strategy.value,
            },
        }

    def _route_card(self, name: str) -> dict[str, Any]:
        route = self.registry.routes_by_model()[name]
        tiers = []
        for tier in route.tiers:
            model = self.registry.deployment(route.namespace, tier.deployment)
            ready = len(self.registry.endpoints(model)) if model is not None else 0
            tiers.append({"name": tier.name, "llmdeployment": tier.deployment, "ready_replicas": ready})
        return {
            "id": name,
            "object": "model",
            "created": 0,
            "owned_by": "kubellm-route",
            "kubellm": {
                "namespace": route.namespace,
                "llmroute": route.name,
                "tiers": tiers,
                "classifier": route.classifier.deployment if route.classifier else None,
            },
        }

    def _card(self, name: str) -> dict[str, Any] | None:
        if name in self.registry.by_served_name():
            return self._model_card(name)
        if name in self.registry.routes_by_model():
            return self._route_card(name)
        return None

    def _known(self) -> list[str]:
        return sorted({*self.registry.by_served_name(), *self.registry.routes_by_model()})

    async def models(self, _: web.Request) -> web.Response:
        cards = [self._card(n) for n in self._known()]
        return web.json_response({"object": "list", "data": [c for c in cards if c is not None]})

    async def model(self, request: web.Request) -> web.Response:
        card = self._card(request.match_info["name"])
        if card is None:
            return self.unknown(request.match_info["name"]).response()
        return web.json_response(card)

    def unknown(self, served: str) -> GatewayError:
        known = ", ".join(self._known()) or "none"
        return GatewayError(
            404, f"The model {served!r} does not exist. Known models: {known}.", param="model", code="model_not_found"
        )

    async def routed(self, request: web.Request) -> web.StreamResponse:
        record = RequestRecord(id=uuid.uuid4().hex[:16], route=request.path, started=time.monotonic())
        response: web.StreamResponse | None = None
        try:
            response = await self._routed(request, record)
        except GatewayError as exc:
            response = exc.response()
            response.headers.update(record.headers)
        except asyncio.CancelledError:
            record.status = 499  # the client went away (nginx's code for it)
            raise
        finally:
            if response is not None:
                record.status = response.status
            if record.caller is not None and record.status == 200 and record.tail:
                self.access.charge_answer(record.caller, bytes(record.tail), record.content_events)
            self._finish(record)
        return response

    async def _routed(self, request: web.Request, record: RequestRecord) -> web.StreamResponse:
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge as exc:
            limit = self.settings.max_body_bytes
            raise GatewayError(413, f"the request body is over the gateway's limit of {limit} bytes") from exc
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise GatewayError(400, f"the request body is not valid JSON: {exc}") from exc
        if not isinstance(body, dict):
            raise GatewayError(400, "the request body must be a JSON object")
        served = body.get("model")
        if not isinstance(served, str) or not served:
            raise GatewayError(400, "model is required: the served model name to route to", param="model")
        record.model = served
        record.stream = body.get("stream") is True
        record.caller = request.get(CALLER, ANONYMOUS)
        record.metered = self.access.meters_answers
        # the prompt estimated once, if at all: for the rate limit and for a route's rules
        estimate = functools.cache(lambda: features(request_kind(body), body))
        if request.path in ("/v1/chat/completions", "/v1/completions"):
            self.access.limit(record.caller, estimate)
        model = self.registry.lookup(served)
        if model is None:
            route = self.registry.lookup_route(served)
            if route is None:
                raise self.unknown(served)
            return await serve_route(
                self.forwarder, self.registry, self.metrics, request, route, (body, estimate()), record,
                self.settings.prefix_chars,
            )  # fmt: skip
        key = None
        if model.strategy is Strategy.PREFIX_HASH:
            key = prefix_key(ROUTED[request.path], body, self.settings.prefix_chars)
        return await self.forwarder.forward(request, model, (raw, body), key, record)

    async def websocket(self, request: web.Request) -> web.WebSocketResponse:
        return await proxy_websocket(self, request, request.get(CALLER, ANONYMOUS))

    def _finish(self, record: RequestRecord) -> None:
        self.metrics.requests.labels(record.model or "", str(record.status)).inc()
        if record.added_seconds is not None:
            self.metrics.added_latency.observe(record.added_seconds)
        forwarded = record.attempt_started
        line = {
            "time": datetime.fromtimestamp(record.arrived, UTC).isoformat(timespec="milliseconds"),
            "id": record.id,
            "route": record.route,
            "model": record.model,
            "llmroute": record.llm_route,
            "tier": record.tier,
            "stream": record.stream,
            "status": record.status,
            "replica": record.replica,
            "decision": record.decision,
            "retries": record.retries,
            "held_s": round(record.held_seconds, 3),
            # from its arrival to the start of the last try on a replica (the one that answered, if one did): for a
            # request held at zero, when the gateway let it through
            "forwarded_s": None if forwarded is None else round(forwarded - record.started, 3),
            "added_ms": None if record.added_seconds is None else round(1000 * record.added_seconds, 3),
            "duration_s": round(time.monotonic() - record.started, 3),
            "bytes": record.bytes_out,
            "cache": record.cache,
            "caller": record.caller,
        }
        access_log.info(json.dumps(line))


def _access(gateway: Gateway) -> Any:
    @web.middleware
    async def middleware(request: web.Request, handler: Any) -> web.StreamResponse:
        """API keys on everything but the probes and /metrics (rate limits apply in `routed`, to generations)."""
        try:
            request[CALLER] = gateway.access.authenticate(request.path, request.headers.get("Authorization"))
        except GatewayError as exc:
            return exc.response()
        return await handler(request)

    return middleware


@web.middleware
async def _errors(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPNotFound:
        return GatewayError(404, f"no route {request.path}").response()
    except web.HTTPMethodNotAllowed:
        return GatewayError(405, f"{request.method} is not allowed on {request.path}").response()


def build_app(gateway: Gateway) -> web.Application:
    app = web.Application(client_max_size=gateway.settings.max_body_bytes, middlewares=[_errors, _access(gateway)])
    for path in ROUTED:
        app.router.add_post(path, gateway.routed)
    app.router.add_get("/v1/chat/completions/ws", gateway.websocket)
    app.router.add_get("/v1/models", gateway.models)
    app.router.add_get("/v1/models/{name:.+}", gateway.model)
    app.router.add_get("/healthz", gateway.health)
    app.router.add_get(contract.HEALTH_PATH, gateway.health)
    app.router.add_get("/ready", gateway.ready)
    app.router.add_get(contract.METRICS_PATH, gateway.prometheus)
    app.on_startup.append(gateway.start)
    app.on_cleanup.append(gateway.stop)
    return app

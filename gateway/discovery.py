"""What the gateway knows of the cluster, kept by watches: each LLMDeployment (its served model name, replicas,
routing strategy), the Ready runtime pods of each (by the operator's labels; a pod's readiness is its readiness
probe on the runtime's /ready), and the LLMRoutes (virtual models over tiers of LLMDeployments, route.py).
Changes wake whoever waits on `changed()` (held requests).

Pods rather than EndpointSlices: the same readiness, one object fewer in between (no endpoint-slice controller
lag), and what the operator itself reads; it also works where slices cannot carry the pods' addresses (the test
cluster's pods have loopback IPs, which the EndpointSlice API refuses).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from kubellm import contract
from kubellm.gateway.balance import Strategy
from kubellm.gateway.route import Route, RouteError, parse_route

log = logging.getLogger("kubellm.gateway.discovery")
JSON = dict[str, Any]
RUNTIME_SELECTOR = ",".join(
    (
        f"{contract.LABEL_MANAGED_BY}={contract.MANAGED_BY_OPERATOR}",
        f"{contract.LABEL_COMPONENT}={contract.COMPONENT_RUNTIME}",
    )
)
PORT_NAME = "http"


@dataclass(frozen=True)
class Model:
    namespace: str
    name: str  # the LLMDeployment's (and its Service's) name
    served_name: str
    replicas: int
    strategy: Strategy
    waking: bool  # the wake annotation is set
    cache_ttl_seconds: float | None = None  # spec.routing.responseCache: None when off

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)


@dataclass(frozen=True)
class Endpoint:
    id: str  # the pod's name (stable across IP reuse), else the address
    url: str  # http://ip:port


def parse_model(obj: JSON) -> Model | None:
    meta, spec = obj.get("metadata") or {}, obj.get("spec") or {}
    if meta.get("deletionTimestamp") is not None:
        return None
    name, namespace = str(meta.get("name", "")), str(meta.get("namespace", ""))
    model_spec = spec.get("model") or {}
    routing = spec.get("routing") or {}
    strategy_name = routing.get("strategy", Strategy.PREFIX_HASH.value)
    cache = routing.get("responseCache") or {}
    try:
        strategy = Strategy(strategy_name)
    except ValueError:
        strategy = Strategy.PREFIX_HASH
    return Model(
        namespace=namespace,
        name=name,
        served_name=str(model_spec.get("servedModelName") or name),
        replicas=int(spec.get("replicas", 1)),
        strategy=strategy,
        waking=contract.ANNOTATION_WAKE in (meta.get("annotations") or {}),
        cache_ttl_seconds=float(cache.get("ttlSeconds", 300)) if cache.get("enabled") is True else None,
    )


def parse_pod(obj: JSON) -> tuple[str, Endpoint | None]:
    """(LLMDeployment name, the pod's endpoint if it is Ready, not terminating and serves the API: of a multi-node
    replica group only pod 0 does) of one runtime pod."""
    meta, status = obj.get("metadata") or {}, obj.get("status") or {}
    labels = meta.get("labels") or {}
    owner = str(labels.get(contract.LABEL_INSTANCE, ""))
    ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or ())
    ip = status.get("podIP")
    worker = contract.LABEL_GROUP in labels and labels.get(contract.LABEL_POD_INDEX) != "0"
    if not ready or not ip or worker or meta.get("deletionTimestamp") is not None:
        return owner, None
    port = contract.CONTAINER_PORT
    for container in (obj.get("spec") or {}).get("containers") or ():
        for p in container.get("ports") or ():
            if p.get("name") == PORT_NAME:
                port = int(p.get("containerPort", port))
    host = f"[{ip}]" if ":" in ip else ip
    return owner, Endpoint(id=str(meta.get("name", ip)), url=f"http://{host}:{port}")


def _key(obj: JSON) -> tuple[str, str]:
    meta = obj.get("metadata") or {}
    return (str(meta.get("namespace", "")), str(meta.get("name", "")))


class Registry:
    def __init__(self) -> None:
        self.models: dict[tuple[str, str], Model] = {}  # by (namespace, LLMDeployment name)
        self.pods: dict[tuple[str, str], tuple[str, Endpoint | None]] = {}  # by (namespace, pod name)
        self.routes: dict[tuple[str, str], Route] = {}  # by (namespace, LLMRoute name)
        self._changed = asyncio.Event()
        self._by_name: dict[str, Model] | None = None
        self._routes_by_model: dict[str, Route] | None = None
        self._reported: set[tuple[str, str, str]] = set()  # (namespace, route, served name) collisions logged

    # -- informer callbacks -----------------------------------------------------------------------------------

    def replace_models(self, items: Iterable[JSON], namespace: str | None = None) -> None:
        self.models = {k: m for k, m in self.models.items() if namespace is not None and k[0] != namespace}
        for obj in items:
            self.model_event("ADDED", obj)
        self._notify()

    def model_event(self, kind: str, obj: JSON) -> None:
        key = _key(obj)
        model = None if kind == "DELETED" else parse_model(obj)
        if model is None:
            self.models.pop(key, None)
        else:
            self.models[key] = model
        self._notify()

    def replace_routes(self, items: Iterable[JSON], namespace: str | None = None) -> None:
        self.routes = {k: r for k, r in self.routes.items() if namespace is not None and k[0] != namespace}
        for obj in items:
            self.route_event("ADDED", obj)
        self._notify()

    def route_event(self, kind: str, obj: JSON) -> None:
        key = _key(obj)
        route = None
        if kind != "DELETED":
            try:
                route = parse_route(obj)
            except RouteError as exc:
                log.warning("LLMRoute %s/%s is not served: %s", *key, exc)
        if route is None:
            self.routes.pop(key, None)
        else:
            self.routes[key] = route
        self._notify()

    def replace_pods(self, items: Iterable[JSON], namespace: str | None = None) -> None:
        self.pods = {k: p for k, p in self.pods.items() if namespace is not None and k[0] != namespace}
        for obj in items:
            self.pod_event("ADDED", obj)
        self._notify()

    def pod_event(self, kind: str, obj: JSON) -> None:
        key = _key(obj)
        before = self.pods.get(key)
        if kind == "DELETED":
            self.pods.pop(key, None)
        else:
            self.pods[key] = parse_pod(obj)
        if self.pods.get(key) != before:  # a pod's status is rewritten often; only readiness and address matter
            self._notify()

    # -- what the proxy reads ---------------------------------------------------------------------------------

    def _notify(self) -> None:
        self._by_name = None
        self._routes_by_model = None
        self._changed.set()
        self._changed = asyncio.Event()

    def changed(self) -> asyncio.Event:
        """An event set at the next change (take it, then check the state, then wait on it)."""
        return self._changed

    def by_served_name(self) -> dict[str, Model]:
        """Served name -> model; two LLMDeployments serving one name: the first by (namespace, name) wins."""
        if self._by_name is not None:
            return self._by_name
        found: dict[str, Model] = {}
        for key in sorted(self.models):
            model = self.models[key]
            if model.served_name in found:
                log.debug("%s/%s also serves %s: ignored", *key, model.served_name)
                continue
            found[model.served_name] = model
        self._by_name = found
        return found

    def lookup(self, served_name: str) -> Model | None:
        return self.by_served_name().get(served_name)

    def routes_by_model(self) -> dict[str, Route]:
        """Virtual model name -> route. A name an LLMDeployment serves stays the LLMDeployment's (the route is
        logged, once, and not served); two routes of one name: the first by (namespace, name) wins."""
        if self._routes_by_model is not None:
            return self._routes_by_model
        served = self.by_served_name()
        found: dict[str, Route] = {}
        for key in sorted(self.routes):
            route = self.routes[key]
            if route.model in served:
                model = served[route.model]
                if (*key, route.model) not in self._reported:
                    self._reported.add((*key, route.model))
                    log.warning(
                        "LLMRoute %s/%s is not served: its model %r is served by LLMDeployment %s/%s",
                        *key,
                        route.model,
                        *model.key,
                    )
                continue
            if route.model in found:
                log.debug("LLMRoute %s/%s also names %s: ignored", *key, route.model)
                continue
            found[route.model] = route
        self._routes_by_model = found
        return found

    def lookup_route(self, model: str) -> Route | None:
        return self.routes_by_model().get(model)

    def deployment(self, namespace: str, name: str) -> Model | None:
        return self.models.get((namespace, name))

    def endpoints(self, model: Model) -> list[Endpoint]:
        found = [
            ep
            for (namespace, _), (owner, ep) in self.pods.items()
            if ep is not None and namespace == model.namespace and owner == model.name
        ]
        return sorted(found, key=lambda e: e.id)

    def all_endpoints(self) -> list[Endpoint]:
        return [ep for model in self.models.values() for ep in self.endpoints(model)]

"""What the gateway knows of the cluster, kept by watches: each LLMDeployment (its served model name, replicas,
routing strategy) and the ready endpoints of its Service (EndpointSlices, which the endpoint-slice controller
fills from the pods' readiness). Changes wake whoever waits on `changed()` (held requests).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from kubellm import contract
from kubellm.gateway.balance import Strategy

log = logging.getLogger("kubellm.gateway.discovery")
JSON = dict[str, Any]
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
PORT_NAME = "http"


@dataclass(frozen=True)
class Model:
    namespace: str
    name: str  # the LLMDeployment's (and its Service's) name
    served_name: str
    replicas: int
    strategy: Strategy
    waking: bool  # the wake annotation is set

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
    strategy_name = (spec.get("routing") or {}).get("strategy", Strategy.PREFIX_HASH.value)
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
    )


def parse_slice(obj: JSON) -> tuple[str, tuple[Endpoint, ...]]:
    """(service name, ready endpoints) of one EndpointSlice."""
    meta = obj.get("metadata") or {}
    service = str((meta.get("labels") or {}).get(SERVICE_NAME_LABEL, ""))
    ports = obj.get("ports") or []
    port = next((p.get("port") for p in ports if p.get("name") == PORT_NAME), None)
    if port is None:
        port = ports[0].get("port") if ports else contract.CONTAINER_PORT
    endpoints = []
    for ep in obj.get("endpoints") or []:
        conditions = ep.get("conditions") or {}
        if conditions.get("ready") is False or conditions.get("terminating") is True:
            continue
        for address in (ep.get("addresses") or [])[:1]:
            host = f"[{address}]" if ":" in address else address
            ref = ep.get("targetRef") or {}
            endpoints.append(Endpoint(id=str(ref.get("name") or address), url=f"http://{host}:{port}"))
    return service, tuple(endpoints)


def _key(obj: JSON) -> tuple[str, str]:
    meta = obj.get("metadata") or {}
    return (str(meta.get("namespace", "")), str(meta.get("name", "")))


class Registry:
    def __init__(self) -> None:
        self.models: dict[tuple[str, str], Model] = {}  # by (namespace, LLMDeployment name)
        self.slices: dict[tuple[str, str], tuple[str, tuple[Endpoint, ...]]] = {}  # by (namespace, slice name)
        self._changed = asyncio.Event()
        self._by_name: dict[str, Model] | None = None

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

    def replace_slices(self, items: Iterable[JSON], namespace: str | None = None) -> None:
        self.slices = {k: s for k, s in self.slices.items() if namespace is not None and k[0] != namespace}
        for obj in items:
            self.slice_event("ADDED", obj)
        self._notify()

    def slice_event(self, kind: str, obj: JSON) -> None:
        key = _key(obj)
        if kind == "DELETED":
            self.slices.pop(key, None)
        else:
            self.slices[key] = parse_slice(obj)
        self._notify()

    # -- what the proxy reads ---------------------------------------------------------------------------------

    def _notify(self) -> None:
        self._by_name = None
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

    def endpoints(self, model: Model) -> list[Endpoint]:
        seen: dict[str, Endpoint] = {}
        for (namespace, _), (service, endpoints) in self.slices.items():
            if namespace == model.namespace and service == model.name:
                for ep in endpoints:
                    seen.setdefault(ep.id, ep)
        return sorted(seen.values(), key=lambda e: e.id)

    def all_endpoints(self) -> list[Endpoint]:
        return [ep for model in self.models.values() for ep in self.endpoints(model)]

"""The kopf handlers: thin glue between watch events and the pure modules.

    create / update / resume  ->  parse spec -> render -> server-side apply -> status
    timer (every few seconds) ->  [scrape Ready pods -> decide -> scale subresource + Event] -> status
    Deployment event          ->  status (readiness shows at once, not at the next tick)

Deployments, pods, PDBs and the LLMDeployments themselves are not read from the API server on every tick:
kopf indices keep their current state in memory, fed by watches. `register()` attaches every handler to a
registry; each decorator states its retries, backoff and timeout (kopf's event handlers take none: the timer's
next tick redoes what one of them missed).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import kopf
import pydantic
from kubernetes.client.exceptions import ApiException

from kubellm.operator import constants as c
from kubellm.operator.apply import Kube, make_api_client
from kubellm.operator.autoscaler import Observation, Policy, Recommendation, decide, seed_history
from kubellm.operator.metrics import Scraper, ScrapeTarget, metrics_url
from kubellm.operator.resources import Owner, render
from kubellm.operator.settings import Settings
from kubellm.operator.spec import LLMDeploymentSpec, parse_spec
from kubellm.operator.status import (
    DeploymentState,
    PodSummary,
    ScalingReport,
    build_status,
    invalid_spec_status,
    status_patch,
    summarize_pod,
)

# Status keys that only the autoscaling timer writes; the reconcile handler leaves them alone.
_SCALING_KEYS = ("metrics", "lastScaleTime", "scalingDecisions")
_MANAGED = {c.LABEL_MANAGED_BY: c.MANAGED_BY}


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class AutoscaleMemory:
    """Per-LLMDeployment loop state, in memory only: lost on restart, then re-seeded conservatively."""

    history: tuple[Recommendation, ...] = ()
    last_evaluation: float = -float("inf")
    failures_logged: set[str] = field(default_factory=set)  # pods whose failing scrape was already reported


@dataclass(frozen=True)
class LLMDeploymentRef:
    """What the Deployment event handler needs of an LLMDeployment (kept in a kopf index)."""

    uid: str
    generation: int
    spec: dict[str, Any]
    status: dict[str, Any]

    @classmethod
    def from_body(cls, body: kopf.Body) -> LLMDeploymentRef:
        return cls(
            uid=str(body.metadata.uid),
            generation=int(body.metadata.get("generation", 0)),
            # Shallow copies: kopf builds a fresh body per watch event and never mutates an old one.
            spec=dict(body.spec),
            status=dict(body.status),
        )


def _one(store: Iterable[Any] | None) -> Any | None:
    for item in store or ():
        return item
    return None


def _spec_or_error(spec: Mapping[str, Any]) -> tuple[LLMDeploymentSpec | None, str | None]:
    try:
        return parse_spec(dict(spec)), None
    except pydantic.ValidationError as exc:
        first = exc.errors()[0]
        where = "spec." + ".".join(str(p) for p in first["loc"])
        return None, f"{where}: {first['msg']}"


def register(registry: kopf.OperatorRegistry, settings: Settings) -> None:
    """Attach the operator's handlers to `registry`, configured by `settings`."""
    policy: dict[str, Any] = {
        "retries": settings.handler_retries,
        "backoff": settings.handler_backoff_seconds,
        "timeout": settings.handler_timeout_seconds,
        "registry": registry,
    }
    resource = (c.GROUP, c.VERSION, c.PLURAL)
    operator_settings = settings  # `settings` below is kopf's own, as kopf names the startup kwarg

    @kopf.on.startup(id="configure", retries=3, backoff=2.0, timeout=60.0, registry=registry)
    def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
        # Progress and diff-base in annotations under our prefix: the status is ours, and its schema is structural
        # (kopf's default status.kopf field would be pruned by the API server).
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(
            prefix=c.KOPF_ANNOTATION_PREFIX, v1=False
        )
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
            prefix=c.KOPF_ANNOTATION_PREFIX, v1=False
        )
        settings.persistence.finalizer = f"{c.KOPF_ANNOTATION_PREFIX}/finalizer"
        # Only warnings become Events by kopf itself; scaling decisions are posted explicitly.
        settings.posting.level = logging.WARNING
        settings.execution.max_workers = operator_settings.max_workers
        settings.watching.server_timeout = 300
        settings.watching.client_timeout = 330
        memo.kube = Kube(make_api_client(pool_size=operator_settings.max_workers))
        memo.scraper = Scraper(
            timeout_seconds=operator_settings.scrape_timeout_seconds,
            concurrency=operator_settings.scrape_concurrency,
        )

    @kopf.on.login(id="login", retries=3, backoff=2.0, timeout=30.0, registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        # A custom registry has no default login: in a pod, the service account; elsewhere, $KUBECONFIG.
        return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)

    @kopf.on.cleanup(id="close", retries=1, backoff=1.0, timeout=10.0, registry=registry)
    async def close(memo: kopf.Memo, **_: Any) -> None:
        scraper = memo.get("scraper")
        if scraper is not None:
            await scraper.close()

    # Index ids are the kwarg names the other handlers receive them by.
    @kopf.index(
        "apps",
        "v1",
        "deployments",
        id="deployments_by_owner",
        labels=_MANAGED,
        retries=3,
        backoff=1.0,
        timeout=10.0,
        registry=registry,
    )
    def deployments_by_owner(namespace: str | None, name: str, body: kopf.Body, **_: Any) -> dict[Any, DeploymentState]:
        return {(namespace, name): DeploymentState.from_object(body)}

    @kopf.index(
        "", "v1", "pods", id="pods_by_owner", labels=_MANAGED, retries=3, backoff=1.0, timeout=10.0, registry=registry
    )
    def pods_by_owner(namespace: str | None, labels: kopf.Labels, body: kopf.Body, **_: Any) -> dict[Any, PodSummary]:
        return {(namespace, labels.get(c.LABEL_INSTANCE, "")): summarize_pod(body)}

    @kopf.index(
        "policy",
        "v1",
        "poddisruptionbudgets",
        id="pdbs_by_owner",
        labels=_MANAGED,
        retries=3,
        backoff=1.0,
        timeout=10.0,
        registry=registry,
    )
    def pdbs_by_owner(namespace: str | None, name: str, **_: Any) -> dict[Any, bool]:
        # Lets a reconcile know a PDB is there to prune without asking the API server every time.
        return {(namespace, name): True}

    @kopf.index(*resource, id="llmds_by_key", retries=3, backoff=1.0, timeout=10.0, registry=registry)
    def llmds_by_key(namespace: str | None, name: str, body: kopf.Body, **_: Any) -> dict[Any, LLMDeploymentRef]:
        return {(namespace, name): LLMDeploymentRef.from_body(body)}

    # kopf's event handlers have no retry policy: a status refresh lost here is redone by the timer's next tick.
    @kopf.on.event("apps", "v1", "deployments", id="deployment_changed", labels=_MANAGED, registry=registry)
    async def deployment_changed(
        type: str | None,
        namespace: str | None,
        name: str,
        body: kopf.Body,
        memo: kopf.Memo,
        logger: kopf.Logger,
        llmds_by_key: kopf.Index[Any, LLMDeploymentRef] | None = None,
        pods_by_owner: kopf.Index[Any, PodSummary] | None = None,
        **_: Any,
    ) -> None:
        """A Deployment's status moved (pods became Ready, a rollout progressed): show it at once in the owner's
        status rather than at the owner's next timer tick."""
        assert llmds_by_key is not None and pods_by_owner is not None
        ref: LLMDeploymentRef | None = _one(llmds_by_key.get((namespace, name)))
        if type == "DELETED" or namespace is None or ref is None:
            return
        parsed, _error = _spec_or_error(ref.spec)
        if parsed is None:
            return
        new = build_status(
            owner=Owner(name=name, namespace=namespace, uid=ref.uid),
            generation=int(ref.status.get("observedGeneration") or ref.generation),
            spec=parsed,
            deployment=DeploymentState.from_object(body),
            pods=list(pods_by_owner.get((namespace, name), ())),
            previous=ref.status,
            now=now_iso(),
        )
        previous = dict(ref.status)
        for key in _SCALING_KEYS:
            new.pop(key, None)
            previous.pop(key, None)
        patch = status_patch(previous, new)
        if patch:
            kube: Kube = memo.kube
            await asyncio.wait_for(
                asyncio.to_thread(kube.patch_status, namespace, name, patch), operator_settings.handler_timeout_seconds
            )

    @kopf.on.resume(*resource, id="reconcile", **policy)
    @kopf.on.create(*resource, id="reconcile", **policy)
    @kopf.on.update(*resource, id="reconcile", **policy)
    def reconcile(
        name: str,
        namespace: str | None,
        uid: str,
        spec: kopf.Spec,
        status: kopf.Status,
        meta: kopf.Meta,
        patch: kopf.Patch,
        memo: kopf.Memo,
        logger: kopf.Logger,
        pods_by_owner: kopf.Index[Any, PodSummary] | None = None,  # kopf passes indices by name
        pdbs_by_owner: kopf.Index[Any, bool] | None = None,
        **_: Any,
    ) -> None:
        assert pods_by_owner is not None and pdbs_by_owner is not None
        assert namespace is not None  # the CRD is namespaced
        owner = Owner(name=name, namespace=namespace, uid=uid)
        generation = int(meta.get("generation", 0))
        previous = dict(status)
        parsed, error = _spec_or_error(spec)
        deployment_state: DeploymentState | None = None
        if parsed is not None:
            desired = render(owner, parsed, operator_settings)
            kube: Kube = memo.kube
            try:
                for obj in desired.to_apply():
                    applied = kube.apply(obj)
                    if obj["kind"] == "Deployment":
                        deployment_state = DeploymentState.from_object(applied)
                if desired.pdb is None and (namespace, name) in pdbs_by_owner:
                    kube.delete_owned("policy/v1", "PodDisruptionBudget", namespace, name, uid)
            except ApiException as exc:
                if exc.status is not None and 400 <= exc.status < 500 and exc.status not in (409, 429):
                    error = f"applying the desired objects failed: HTTP {exc.status}: {exc.reason}: {exc.body}"
                else:
                    raise  # transient: kopf retries with backoff
        if parsed is None:
            assert error is not None
            patch.status.update(status_patch(previous, invalid_spec_status(previous, generation, error, now_iso())))
            raise kopf.PermanentError(f"invalid spec: {error}")
        new = build_status(
            owner=owner,
            generation=generation,
            spec=parsed,
            deployment=deployment_state,
            pods=list(pods_by_owner.get((namespace, name), ())),
            previous=previous,
            now=now_iso(),
            error=error,
        )
        for key in _SCALING_KEYS:
            new.pop(key, None)
            previous.pop(key, None)
        patch.status.update(status_patch(previous, new))
        if error is not None:
            raise kopf.PermanentError(error)

    # A failed tick is logged and the next one runs as usual (a timer that gave up would end autoscaling).
    @kopf.timer(
        *resource, id="refresh", interval=settings.timer_interval_seconds, errors=kopf.ErrorsMode.IGNORED, **policy
    )
    async def refresh(
        name: str,
        namespace: str | None,
        uid: str,
        body: kopf.Body,
        spec: kopf.Spec,
        status: kopf.Status,
        meta: kopf.Meta,
        patch: kopf.Patch,
        memo: kopf.Memo,
        logger: kopf.Logger,
        pods_by_owner: kopf.Index[Any, PodSummary] | None = None,
        deployments_by_owner: kopf.Index[Any, DeploymentState] | None = None,
        **_: Any,
    ) -> None:
        assert pods_by_owner is not None and deployments_by_owner is not None
        parsed, _error = _spec_or_error(spec)
        if parsed is None or namespace is None:
            return  # the reconcile handler reported it
        owner = Owner(name=name, namespace=namespace, uid=uid)
        pods: list[PodSummary] = list(pods_by_owner.get((namespace, name), ()))
        deployment: DeploymentState | None = _one(deployments_by_owner.get((namespace, name)))
        report = None
        auto = parsed.autoscaling
        memory: AutoscaleMemory = memo.setdefault("autoscale", AutoscaleMemory())
        clock = time.monotonic()
        if auto.enabled and clock - memory.last_evaluation >= auto.evaluation_period_seconds - 0.05:
            memory.last_evaluation = clock
            report, parsed = await _autoscale(body, owner, parsed, pods, memory, memo, logger)
        new = build_status(
            owner=owner,
            generation=int(status.get("observedGeneration") or meta.get("generation", 0)),
            spec=parsed,
            deployment=deployment,
            pods=pods,
            previous=dict(status),
            now=now_iso(),
            scaling=report,
        )
        patch.status.update(status_patch(dict(status), new))


async def _autoscale(
    body: kopf.Body,
    owner: Owner,
    spec: LLMDeploymentSpec,
    pods: list[PodSummary],
    memory: AutoscaleMemory,
    memo: kopf.Memo,
    logger: kopf.Logger,
) -> tuple[ScalingReport, LLMDeploymentSpec]:
    """Scrape, decide, and (builtin mode) scale. Returns the report and the spec as it is after scaling."""
    auto = spec.autoscaling
    live = [p for p in pods if not p.terminating]
    ready = [p for p in live if p.ready and p.ip]
    scraper: Scraper = memo.scraper
    result = await scraper.scrape([ScrapeTarget(p.name, metrics_url(p.ip or "")) for p in ready])
    # Warn once per pod when it starts failing (kopf turns warnings into Events: no Event storm per evaluation).
    failing = dict(result.failures)
    for pod in sorted(set(failing) - memory.failures_logged):
        logger.warning("scraping %s failed: %s", pod, failing[pod])
    memory.failures_logged = set(failing)
    now = now_iso()
    metrics = None
    if result.samples:
        kv = sum(s.kv_cache_usage for s in result.samples) / len(result.samples)
        metrics = {
            "time": now,
            "queueDepth": sum(s.num_requests_waiting for s in result.samples),
            "runningRequests": sum(s.num_requests_running for s in result.samples),
            "kvCacheUtilization": round(kv, 4),
            "kvCachePercent": round(100 * kv),
            "podsScraped": len(result.samples),
            "podsFailed": len(result.failures),
        }
    active = bool(result.samples)
    reason = "MetricsAvailable" if active else "MetricsUnavailable"
    if auto.mode == "external":
        message = "metrics reported; spec.replicas is left to an external autoscaler"
        return ScalingReport(active=True, reason="ExternalAutoscaler", message=message, metrics=metrics), spec

    clock = time.monotonic()
    if not memory.history:
        memory.history = seed_history(clock, spec.replicas)
    observation = Observation(
        time=clock,
        current_replicas=spec.replicas,
        samples=result.samples,
        failed_scrapes=len(result.failures),
        not_ready=sum(1 for p in live if not p.ready and not p.unschedulable_message),
        pending_unschedulable=sum(1 for p in live if p.unschedulable_message),
    )
    decision = decide(observation, Policy.from_spec(auto), memory.history)
    memory.history = decision.history
    message = decision.reason if active else f"no metrics from {len(ready)} Ready pod(s): holding"
    record = None
    if decision.changed:
        kube: Kube = memo.kube
        try:
            await asyncio.to_thread(kube.scale, owner.namespace, owner.name, decision.desired_replicas)
        except ApiException as exc:
            logger.warning("scaling to %d failed: HTTP %s", decision.desired_replicas, exc.status)
            return ScalingReport(active, reason, f"scaling failed: HTTP {exc.status}", metrics=metrics), spec
        verb = "ScaledUp" if decision.desired_replicas > decision.current_replicas else "ScaledDown"
        kopf.event(body, type="Normal", reason=verb, message=decision.reason[:1024])
        logger.info("%s", decision.reason)
        record = {
            "time": now,
            "fromReplicas": decision.current_replicas,
            "toReplicas": decision.desired_replicas,
            "reason": decision.reason[:1024],
        }
        spec = spec.model_copy(update={"replicas": decision.desired_replicas})
    report = ScalingReport(
        active=active,
        reason=reason,
        message=message[:4096],
        limited=decision.limited,
        metrics=metrics,
        decision=record,
        scale_time=now if record else None,
    )
    return report, spec

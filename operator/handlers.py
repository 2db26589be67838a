"""The kopf handlers: thin glue between watch events and the domain modules.

    create / update / resume  ->  reconcile.reconcile (parse -> render -> server-side apply) -> status
    timer (every few seconds) ->  [scaling.autoscale: scrape Ready pods -> decide -> /scale + Event] -> status
                                  [every resync_seconds: reconcile again, whatever happened]
    Deployment event          ->  status (readiness shows at once, not at the next tick)
    owned object event        ->  drift: deleted, or written by another manager -> re-apply it

Deployments, pods, PDBs and the LLMDeployments themselves are not read from the API server on every tick:
kopf indices keep their current state in memory, fed by watches. Every handler is a module-level function that
reads the operator's settings and clients from kopf's memo; `register()` only applies kopf's decorators, each
stating its retries, backoff and timeout (kopf's event handlers take none: the timer's next tick redoes what one
of them missed).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import kopf

from kubellm.operator import constants as c
from kubellm.operator.apply import Kube, make_api_client
from kubellm.operator.drift import controller_owner, foreign_writes, write_key
from kubellm.operator.metrics import Scraper
from kubellm.operator.reconcile import ReconcileOutcome, parse_or_error, reapply_one, reconcile
from kubellm.operator.resources import Owner
from kubellm.operator.scaling import AutoscaleMemory, autoscale
from kubellm.operator.settings import Settings
from kubellm.operator.status import (
    DeploymentState,
    PodSummary,
    build_status,
    invalid_spec_status,
    metrics_due,
    parse_status,
    status_patch,
    summarize_pod,
)

# Status keys that only the autoscaling timer writes; the reconcile handler leaves them alone.
_SCALING_KEYS = ("metrics", "lastScaleTime", "scalingDecisions")
_MANAGED = {c.LABEL_MANAGED_BY: c.MANAGED_BY}
_RESOURCE = (c.GROUP, c.VERSION, c.PLURAL)
# What resources.render produces: watched for drift.
_OWNED = (
    ("", "v1", "configmaps"),
    ("apps", "v1", "deployments"),
    ("", "v1", "services"),
    ("policy", "v1", "poddisruptionbudgets"),
)


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class LLMDeploymentRef:
    """What the Deployment event handler needs of an LLMDeployment (kept in a kopf index)."""

    uid: str
    generation: int
    spec: dict[str, Any]
    status: dict[str, Any]
    resource_version: str = ""
    deleting: bool = False

    @classmethod
    def from_body(cls, body: kopf.Body) -> LLMDeploymentRef:
        return cls(
            uid=str(body.metadata.uid),
            generation=int(body.metadata.get("generation", 0)),
            resource_version=str(body.metadata.get("resourceVersion", "")),
            deleting=body.metadata.get("deletionTimestamp") is not None,
            # Shallow copies: kopf builds a fresh body per watch event and never mutates an old one.
            spec=dict(body.spec),
            status=dict(body.status),
        )


def _one(store: Iterable[Any] | None) -> Any | None:
    for item in store or ():
        return item
    return None


def _without_scaling(status: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in status.items() if k not in _SCALING_KEYS}


def _seen(resource_version: Any, status: Any) -> dict[str, Any]:
    """An LLMDeployment as a watch delivered it, reduced to what Kube.update_status needs."""
    return {"metadata": {"resourceVersion": str(resource_version or "")}, "status": dict(status or {})}


# ---- operator-level handlers ----


def configure(
    settings: kopf.OperatorSettings, memo: kopf.Memo, operator_settings: Settings, **_: Any
) -> None:  # `settings` is kopf's own, as kopf names the startup kwarg
    # Progress and diff-base in annotations under our prefix: the status is ours, and its schema is structural
    # (kopf's default status.kopf field would be pruned by the API server).
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=c.KOPF_ANNOTATION_PREFIX, v1=False)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=c.KOPF_ANNOTATION_PREFIX, v1=False)
    settings.persistence.finalizer = f"{c.KOPF_ANNOTATION_PREFIX}/finalizer"
    # Only warnings become Events by kopf itself; scaling decisions are posted explicitly.
    settings.posting.level = logging.WARNING
    settings.execution.max_workers = operator_settings.max_workers
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    memo.settings = operator_settings
    memo.kube = Kube(make_api_client(pool_size=operator_settings.max_workers))
    memo.scraper = Scraper(
        timeout_seconds=operator_settings.scrape_timeout_seconds, concurrency=operator_settings.scrape_concurrency
    )


def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    # A custom registry has no default login: in a pod, the service account; elsewhere, $KUBECONFIG.
    return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)


async def close(memo: kopf.Memo, **_: Any) -> None:
    scraper = memo.get("scraper")
    if scraper is not None:
        await scraper.close()


# ---- indices (their ids are the kwarg names the other handlers receive them by) ----


def deployments_by_owner(namespace: str | None, name: str, body: kopf.Body, **_: Any) -> dict[Any, DeploymentState]:
    return {(namespace, name): DeploymentState.from_object(body)}


def pods_by_owner(namespace: str | None, labels: kopf.Labels, body: kopf.Body, **_: Any) -> dict[Any, PodSummary]:
    return {(namespace, labels.get(c.LABEL_INSTANCE, "")): summarize_pod(body)}


def pdbs_by_owner(namespace: str | None, name: str, **_: Any) -> dict[Any, bool]:
    # Lets a reconcile know a PDB is there to prune without asking the API server every time.
    return {(namespace, name): True}


def llmds_by_key(namespace: str | None, name: str, body: kopf.Body, **_: Any) -> dict[Any, LLMDeploymentRef]:
    return {(namespace, name): LLMDeploymentRef.from_body(body)}


# ---- resource handlers ----


async def deployment_changed(
    type: str | None,
    namespace: str | None,
    name: str,
    body: kopf.Body,
    memo: kopf.Memo,
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
    spec, _error = parse_or_error(ref.spec)
    if spec is None:
        return
    owner = Owner(name=name, namespace=namespace, uid=ref.uid)
    deployment = DeploymentState.from_object(body)
    pods = list(pods_by_owner.get((namespace, name), ()))
    now = now_iso()

    def compute(current: dict[str, Any]) -> dict[str, Any]:
        new = build_status(
            owner=owner,
            generation=ref.generation,
            spec=spec,
            deployment=deployment,
            pods=pods,
            previous=current,
            now=now,
        )
        return status_patch(_without_scaling(current), _without_scaling(new))

    kube: Kube = memo.kube
    seen = _seen(ref.resource_version, ref.status)
    timeout = memo.settings.handler_timeout_seconds
    await asyncio.wait_for(asyncio.to_thread(kube.update_status, namespace, name, seen, compute), timeout)


async def owned_changed(
    type: str | None,
    namespace: str | None,
    name: str,
    body: kopf.Body,
    memo: kopf.Memo,
    logger: kopf.Logger,
    llmds_by_key: kopf.Index[Any, LLMDeploymentRef] | None = None,
    **_: Any,
) -> None:
    """Drift correction: an owned object was deleted, or another manager wrote it after our last apply -> re-apply
    it from its owner's spec (a forced apply takes back the fields we own; a no-op when none changed)."""
    assert llmds_by_key is not None
    owner_key = controller_owner(body)
    if namespace is None or owner_key is None:
        return
    ref: LLMDeploymentRef | None = _one(llmds_by_key.get((namespace, owner_key[0])))
    if ref is None or ref.uid != owner_key[1] or ref.deleting:
        return
    harmless: set[Any] = memo.setdefault("harmless_writes", set())
    before = str(body.metadata.get("resourceVersion"))
    writes = [key for w in foreign_writes(body) if (key := write_key(w, before)) not in harmless]
    if type != "DELETED" and not writes:
        return
    kube: Kube = memo.kube
    owner = Owner(name=owner_key[0], namespace=namespace, uid=ref.uid)
    if type == "DELETED":
        # The garbage collector deletes the children of a deleted owner: ask the API server, not the index.
        current = await asyncio.to_thread(kube.get_llmd, namespace, owner.name)
        meta = (current or {}).get("metadata") or {}
        if meta.get("uid") != ref.uid or meta.get("deletionTimestamp"):
            return
    kind = str(body.get("kind"))
    applied = await asyncio.to_thread(reapply_one, kube, owner, ref.spec, memo.settings, kind, name)
    if applied is None:
        return
    if type == "DELETED":
        logger.info("re-created %s %s, deleted by someone else", kind, name)
    elif applied.get("metadata", {}).get("resourceVersion") == before:
        harmless.update(writes)  # they touched no field we own
    else:
        logger.info("re-applied %s %s after writes by %s", kind, name, sorted({w.manager for w, _ in writes}))


def reconcile_handler(
    name: str,
    namespace: str | None,
    uid: str,
    spec: kopf.Spec,
    status: kopf.Status,
    meta: kopf.Meta,
    memo: kopf.Memo,
    pods_by_owner: kopf.Index[Any, PodSummary] | None = None,  # kopf passes indices by name
    pdbs_by_owner: kopf.Index[Any, bool] | None = None,
    **_: Any,
) -> None:
    assert pods_by_owner is not None and pdbs_by_owner is not None
    assert namespace is not None  # the CRD is namespaced
    owner = Owner(name=name, namespace=namespace, uid=uid)
    outcome = reconcile(
        memo.kube, owner, spec, int(meta.get("generation", 0)), memo.settings, (namespace, name) in pdbs_by_owner
    )
    pods = list(pods_by_owner.get((namespace, name), ()))
    write_outcome(memo.kube, owner, outcome, pods, _seen(meta.get("resourceVersion"), status))
    if outcome.error is not None:
        # Not retried by kopf: the status shows it, and the periodic resync (or the next spec change) tries again.
        raise kopf.PermanentError(f"invalid spec: {outcome.error}" if outcome.invalid_spec else outcome.error)


def write_outcome(
    kube: Kube, owner: Owner, outcome: ReconcileOutcome, pods: list[PodSummary], seen: dict[str, Any]
) -> None:
    """The status after a reconcile: observedGeneration advances only if the generation was applied; a failure
    shows in Degraded with the API server's message until a reconcile succeeds."""
    now = now_iso()
    generation, spec = outcome.generation, outcome.spec

    def compute(current: dict[str, Any]) -> dict[str, Any]:
        if spec is None:
            assert outcome.error is not None
            return status_patch(current, invalid_spec_status(current, generation, outcome.error, now))
        new = build_status(
            owner=owner,
            generation=generation,
            spec=spec,
            deployment=outcome.deployment,
            pods=pods,
            previous=current,
            now=now,
            error=outcome.error,
            applied=outcome.applied,
        )
        return status_patch(_without_scaling(current), _without_scaling(new))

    kube.update_status(owner.namespace, owner.name, seen, compute)


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
    pdbs_by_owner: kopf.Index[Any, bool] | None = None,
    **_: Any,
) -> None:
    assert pods_by_owner is not None and deployments_by_owner is not None
    parsed, _error = parse_or_error(spec)
    if parsed is None or namespace is None:
        return  # the reconcile handler reported it
    owner = Owner(name=name, namespace=namespace, uid=uid)
    pods: list[PodSummary] = list(pods_by_owner.get((namespace, name), ()))
    deployment: DeploymentState | None = _one(deployments_by_owner.get((namespace, name)))
    report = None
    auto = parsed.autoscaling
    memory: AutoscaleMemory = memo.setdefault("autoscale", AutoscaleMemory())
    clock = time.monotonic()
    kube: Kube = memo.kube
    seen = _seen(meta.get("resourceVersion"), status)
    if clock - memo.setdefault("last_resync", clock) >= memo.settings.resync_seconds:
        # Re-apply everything whatever happened: no object stays unreconciled after a missed event or an outage.
        memo.last_resync = clock
        has_pdb = (namespace, name) in (pdbs_by_owner or {})
        generation = int(meta.get("generation", 0))
        outcome = await asyncio.to_thread(reconcile, kube, owner, spec, generation, memo.settings, has_pdb)
        await asyncio.to_thread(write_outcome, kube, owner, outcome, pods, seen)
        return  # the next tick refreshes from the status just written
    if auto.enabled and clock - memory.last_evaluation >= auto.evaluation_period_seconds - 0.05:
        memory.last_evaluation = clock
        report, parsed = await autoscale(
            body=body,
            owner=owner,
            spec=parsed,
            pods=pods,
            memory=memory,
            kube=memo.kube,
            scraper=memo.scraper,
            logger=logger,
            now=now_iso(),
        )
        previous_metrics = parse_status(status).metrics
        interval = memo.settings.metrics_status_interval_seconds
        if report.metrics is not None and not metrics_due(previous_metrics, report.metrics, interval):
            report = dataclasses.replace(report, metrics=None)  # rate-limited: the last snapshot stands
    now = now_iso()
    generation = int(meta.get("generation", 0))

    def compute(current: dict[str, Any]) -> dict[str, Any]:
        new = build_status(
            owner=owner,
            generation=generation,
            spec=parsed,
            deployment=deployment,
            pods=pods,
            previous=current,
            now=now,
            scaling=report,
        )
        return status_patch(current, new)

    await asyncio.to_thread(kube.update_status, namespace, name, seen, compute)


def register(registry: kopf.OperatorRegistry, settings: Settings) -> None:
    """Attach the operator's handlers to `registry`, configured by `settings`."""
    policy: dict[str, Any] = {
        "retries": settings.handler_retries,
        "backoff": settings.handler_backoff_seconds,
        "timeout": settings.handler_timeout_seconds,
        "registry": registry,
    }
    quick: dict[str, Any] = {"retries": 3, "backoff": 1.0, "timeout": 10.0, "registry": registry}
    on = kopf.on
    on.startup(id="configure", retries=3, backoff=2.0, timeout=60.0, registry=registry)(
        functools.partial(configure, operator_settings=settings)
    )
    on.login(id="login", retries=3, backoff=2.0, timeout=30.0, registry=registry)(login)
    on.cleanup(id="close", retries=1, backoff=1.0, timeout=10.0, registry=registry)(close)

    kopf.index("apps", "v1", "deployments", id="deployments_by_owner", labels=_MANAGED, **quick)(deployments_by_owner)
    kopf.index("", "v1", "pods", id="pods_by_owner", labels=_MANAGED, **quick)(pods_by_owner)
    kopf.index("policy", "v1", "poddisruptionbudgets", id="pdbs_by_owner", labels=_MANAGED, **quick)(pdbs_by_owner)
    kopf.index(*_RESOURCE, id="llmds_by_key", **quick)(llmds_by_key)

    # kopf's event handlers have no retry policy: a status refresh lost here is redone by the timer's next tick.
    on.event("apps", "v1", "deployments", id="deployment_changed", labels=_MANAGED, registry=registry)(
        deployment_changed
    )
    for group, version, plural in _OWNED:
        on.event(group, version, plural, id=f"drift_{plural}", labels=_MANAGED, registry=registry)(owned_changed)
    for decorator in (on.resume, on.create, on.update):
        decorator(*_RESOURCE, id="reconcile", **policy)(reconcile_handler)
    # A failed tick is logged and the next one runs as usual (a timer that gave up would end autoscaling).
    kopf.timer(
        *_RESOURCE, id="refresh", interval=settings.timer_interval_seconds, errors=kopf.ErrorsMode.IGNORED, **policy
    )(refresh)

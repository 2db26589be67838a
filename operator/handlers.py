"""The kopf handlers: thin glue between watch events and the domain modules.

    create / update / resume  ->  reconcile.reconcile (parse -> render -> server-side apply) -> status
    Deployment / StatefulSet  ->  status (readiness shows at once, not at the loop's next tick)
    loader Job event          ->  reconcile (a filled model cache lets the replicas start) -> status
    owned object event        ->  drift: deleted, or written by another manager -> re-apply it
    startup                   ->  loop.FleetLoop, one task over the indices: status, autoscaling, periodic resync

Deployments, StatefulSets (multi-node replica groups), pods, PDBs and the LLMDeployments themselves are not read
from the API server on every tick: kopf indices keep their current state in memory, fed by watches. No handler
needs a finalizer (no timer, no daemon, no deletion handler), so deleting an LLMDeployment never waits for the
operator. Every handler is a module-level function that reads the operator's settings and clients from kopf's
memo; `register()` only applies kopf's decorators, each stating its retries, backoff and timeout (kopf's event
handlers take none: the loop's next tick redoes what one of them missed).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import kopf

from kubellm.operator import constants as c
from kubellm.operator.apply import Kube, in_cluster_server, make_api_client
from kubellm.operator.drift import controller_owner, foreign_writes, write_key
from kubellm.operator.gateway_load import GatewayLoad
from kubellm.operator.groups import StatefulSetState, workload_state
from kubellm.operator.loop import FleetLoop, observe_model, one
from kubellm.operator.metrics import Scraper
from kubellm.operator.model_cache import JobState
from kubellm.operator.peering import Leadership
from kubellm.operator.priority import WritePriority
from kubellm.operator.reconcile import Existing, parse_or_error, reapply_one, reconcile
from kubellm.operator.resources import Owner
from kubellm.operator.settings import Settings
from kubellm.operator.status import DeploymentState, PodSummary, summarize_pod
from kubellm.operator.status_writes import seen, write_outcome, write_refresh

_MANAGED = {c.LABEL_MANAGED_BY: c.MANAGED_BY}
STATUS_COALESCE_SECONDS = 0.5  # workload_changed: one status write per burst of Deployment/StatefulSet events
_RUNTIME_PODS = {**_MANAGED, c.LABEL_COMPONENT: c.COMPONENT_RUNTIME}
_LOADERS = {**_MANAGED, c.LABEL_COMPONENT: c.COMPONENT_MODEL_LOADER}
_RESOURCE = (c.GROUP, c.VERSION, c.PLURAL)
# What resources.render produces: watched for drift.
_OWNED = (
    ("", "v1", "configmaps"),
    ("apps", "v1", "deployments"),
    ("apps", "v1", "statefulsets"),
    ("", "v1", "services"),
    ("policy", "v1", "poddisruptionbudgets"),
    ("batch", "v1", "jobs"),
    ("", "v1", "persistentvolumeclaims"),
)


@dataclass(frozen=True)
class LLMDeploymentRef:
    """What the loop and the event handlers need of an LLMDeployment (kept in a kopf index)."""

    uid: str
    generation: int
    spec: dict[str, Any]
    status: dict[str, Any]
    resource_version: str = ""
    deleting: bool = False
    wake: bool = False  # the wake annotation is set (scale 0 -> 1)
    wake_held: int = 0  # the requests the gateway held when it woke the model (its annotation; 0 when absent)

    @classmethod
    def from_body(cls, body: kopf.Body) -> LLMDeploymentRef:
        return cls(
            uid=str(body.metadata.uid),
            generation=int(body.metadata.get("generation", 0)),
            # Shallow copies: kopf builds a fresh body per watch event and never mutates an old one.
            spec=dict(body.spec),
            status=dict(body.status),
            resource_version=str(body.metadata.get("resourceVersion", "")),
            deleting=body.metadata.get("deletionTimestamp") is not None,
            wake=c.ANNOTATION_WAKE in (body.metadata.annotations or {}),
            wake_held=_count((body.metadata.annotations or {}).get(c.ANNOTATION_WAKE_HELD)),
        )


def _count(value: Any) -> int:
    """A non-negative integer annotation; anything else (absent, garbled) counts as 0."""
    try:
        return max(0, int(str(value)))
    except ValueError:
        return 0


# ---- operator-level handlers ----


def configure(
    settings: kopf.OperatorSettings, memo: kopf.Memo, operator_settings: Settings, **_: Any
) -> None:  # `settings` is kopf's own, as kopf names the startup kwarg
    # Progress and diff-base in annotations under our prefix: the status is ours, and its schema is structural
    # (kopf's default status.kopf field would be pruned by the API server).
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=c.KOPF_ANNOTATION_PREFIX, v1=False)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=c.KOPF_ANNOTATION_PREFIX, v1=False)
    # Named, so that kopf removes it from objects an older version of the operator put it on.
    settings.persistence.finalizer = f"{c.KOPF_ANNOTATION_PREFIX}/finalizer"
    # Only warnings become Events by kopf itself; scaling decisions are posted explicitly.
    settings.posting.level = logging.WARNING
    settings.execution.max_workers = operator_settings.max_workers
    settings.peering.lifetime = operator_settings.peering_lifetime_seconds
    # After its own patch (progress, diff base), kopf waits this long for that version to come back through the
    # watch before it reads older events as the object's state. Under load (hundreds of objects created at once on
    # a busy API server) the watch lags by more than kopf's 5 s default, and an object would look "created" again
    # and be reconciled again and again: wait long enough to see the operator's own writes.
    settings.persistence.consistency_timeout = 30.0
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    memo.settings = operator_settings
    memo.kube = Kube(make_api_client(pool_size=operator_settings.max_workers))
    memo.write_priority = WritePriority()
    memo.scraper = Scraper(
        timeout_seconds=operator_settings.scrape_timeout_seconds, concurrency=operator_settings.scrape_concurrency
    )
    memo.leadership = Leadership(
        identity=str(memo.get("identity", "")),
        priority=int(memo.get("priority", 0)),
        peering=bool(operator_settings.peering),
    )


async def start_loop(
    memo: kopf.Memo,
    llmds_by_key: kopf.Index[Any, LLMDeploymentRef] | None = None,  # kopf hands startup handlers the indices
    pods_by_owner: kopf.Index[Any, PodSummary] | None = None,
    deployments_by_owner: kopf.Index[Any, DeploymentState] | None = None,
    pdbs_by_owner: kopf.Index[Any, bool] | None = None,
    statefulsets_by_owner: kopf.Index[Any, StatefulSetState] | None = None,
    jobs_by_owner: kopf.Index[Any, JobState] | None = None,
    **_: Any,
) -> None:
    assert llmds_by_key is not None and pods_by_owner is not None
    assert deployments_by_owner is not None and pdbs_by_owner is not None and statefulsets_by_owner is not None
    assert jobs_by_owner is not None
    # Every blocking API call (the handlers' and the loop's asyncio.to_thread) runs on the loop's default executor:
    # size it as the settings say. asyncio's own default, min(32, CPUs + 4), is 6 threads on a 2-core node, which
    # queued 200 objects created at once behind 6 calls in flight.
    workers = ThreadPoolExecutor(max_workers=memo.settings.max_workers, thread_name_prefix="kubellm-api")
    asyncio.get_running_loop().set_default_executor(workers)
    urls = memo.settings.gateway_metrics_urls
    loop = FleetLoop(
        settings=memo.settings,
        kube=memo.kube,
        scraper=memo.scraper,
        leadership=memo.leadership,
        llmds=llmds_by_key,
        pods=pods_by_owner,
        deployments=deployments_by_owner,
        pdbs=pdbs_by_owner,
        statefulsets=statefulsets_by_owner,
        jobs=jobs_by_owner,
        priority=memo.write_priority,
        gateway=GatewayLoad(urls, timeout_seconds=memo.settings.scrape_timeout_seconds) if urls else None,
    )
    memo.loop_task = asyncio.create_task(loop.run(), name="kubellm fleet loop")


def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    # A custom registry has no default login: in a pod, the service account; elsewhere, $KUBECONFIG.
    info = kopf.login_with_service_account(**kwargs)
    if info is None:
        return kopf.login_with_kubeconfig(**kwargs)
    # kopf names the server https://kubernetes.default.svc, which only cluster DNS resolves (a real node's pod
    # without it failed every request); the Service's address from the pod's environment needs none.
    server = in_cluster_server(os.environ)
    return dataclasses.replace(info, server=server) if server else info


async def close(memo: kopf.Memo, **_: Any) -> None:
    task = memo.get("loop_task")
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    scraper = memo.get("scraper")
    if scraper is not None:
        await scraper.close()


# ---- indices (their ids are the kwarg names the other handlers receive them by) ----


def deployments_by_owner(namespace: str | None, name: str, body: kopf.Body, **_: Any) -> dict[Any, DeploymentState]:
    return {(namespace, name): DeploymentState.from_object(body)}


def statefulsets_by_owner(
    namespace: str | None, labels: kopf.Labels, body: kopf.Body, **_: Any
) -> dict[Any, StatefulSetState]:
    # A multi-node replica group's StatefulSet, by owner: one LLMDeployment has one per group.
    return {(namespace, labels.get(c.LABEL_INSTANCE, "")): StatefulSetState.from_object(body)}


def jobs_by_owner(namespace: str | None, labels: kopf.Labels, body: kopf.Body, **_: Any) -> dict[Any, JobState]:
    # The loader Jobs of storage.modelCache, by owner.
    return {(namespace, labels.get(c.LABEL_INSTANCE, "")): JobState.from_object(body)}


def pods_by_owner(namespace: str | None, labels: kopf.Labels, body: kopf.Body, **_: Any) -> dict[Any, PodSummary]:
    return {(namespace, labels.get(c.LABEL_INSTANCE, "")): summarize_pod(body)}


def pdbs_by_owner(namespace: str | None, name: str, **_: Any) -> dict[Any, bool]:
    # Lets a reconcile know a PDB is there to prune without asking the API server every time.
    return {(namespace, name): True}


def llmds_by_key(namespace: str | None, name: str, body: kopf.Body, **_: Any) -> dict[Any, LLMDeploymentRef]:
    return {(namespace, name): LLMDeploymentRef.from_body(body)}


# ---- resource handlers ----


async def workload_changed(
    type: str | None,
    namespace: str | None,
    labels: kopf.Labels,
    memo: kopf.Memo,
    llmds_by_key: kopf.Index[Any, LLMDeploymentRef] | None = None,
    pods_by_owner: kopf.Index[Any, PodSummary] | None = None,
    deployments_by_owner: kopf.Index[Any, DeploymentState] | None = None,
    statefulsets_by_owner: kopf.Index[Any, StatefulSetState] | None = None,
    **_: Any,
) -> None:
    """A Deployment's or a group StatefulSet's status moved (pods became Ready, a rollout progressed): show it in
    the owner's status within STATUS_COALESCE_SECONDS rather than at the loop's next tick. A rollout is a burst of
    events: the first schedules one write, which reads the indices as they are by then; the others, meanwhile,
    only find it scheduled (fewer status writes at scale, and fewer conflicts between them)."""
    assert llmds_by_key is not None and pods_by_owner is not None
    assert deployments_by_owner is not None and statefulsets_by_owner is not None
    key = (namespace, labels.get(c.LABEL_INSTANCE, ""))
    scheduled: set[Any] = memo.setdefault("status_scheduled", set())
    if type == "DELETED" or key in scheduled:
        return
    scheduled.add(key)
    try:
        await asyncio.sleep(STATUS_COALESCE_SECONDS)
        await memo.write_priority.refresh_turn()
    finally:
        scheduled.discard(key)  # events from here on schedule a write of their own
    ref: LLMDeploymentRef | None = one(llmds_by_key.get(key))
    if namespace is None or ref is None or not memo.leadership.active():
        return
    spec, _error = parse_or_error(ref.spec)
    if spec is None:
        return
    state = workload_state(spec, key, deployments_by_owner, statefulsets_by_owner)
    owner = Owner(name=key[1], namespace=namespace, uid=ref.uid)
    pods = list(pods_by_owner.get(key, ()))
    args = (memo.kube, owner, ref.generation, spec, state, pods)
    last_seen = seen(ref.resource_version, ref.status)
    write = functools.partial(write_refresh, *args, last_seen, with_scaling_keys=False)
    await asyncio.wait_for(asyncio.to_thread(write), memo.settings.handler_timeout_seconds)


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
    ref: LLMDeploymentRef | None = one(llmds_by_key.get((namespace, owner_key[0])))
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


async def job_changed(
    type: str | None,
    namespace: str | None,
    labels: kopf.Labels,
    memo: kopf.Memo,
    llmds_by_key: kopf.Index[Any, LLMDeploymentRef] | None = None,
    pods_by_owner: kopf.Index[Any, PodSummary] | None = None,
    pdbs_by_owner: kopf.Index[Any, bool] | None = None,
    deployments_by_owner: kopf.Index[Any, DeploymentState] | None = None,
    statefulsets_by_owner: kopf.Index[Any, StatefulSetState] | None = None,
    jobs_by_owner: kopf.Index[Any, JobState] | None = None,
    **_: Any,
) -> None:
    """A loader Job moved: once it completes, a reconcile brings the replicas up from 0 at once (not at the next
    resync); its status shows the model cache's state."""
    assert llmds_by_key is not None and pods_by_owner is not None and pdbs_by_owner is not None
    assert deployments_by_owner is not None and statefulsets_by_owner is not None and jobs_by_owner is not None
    key = (namespace, labels.get(c.LABEL_INSTANCE, ""))
    ref: LLMDeploymentRef | None = one(llmds_by_key.get(key))
    if type == "DELETED" or namespace is None or ref is None or ref.deleting or not memo.leadership.active():
        return
    spec, _error = parse_or_error(ref.spec)
    if spec is None or spec.storage.model_cache is None:
        return
    owner = Owner(name=key[1], namespace=namespace, uid=ref.uid)
    existing = Existing.from_indices(key, pdbs_by_owner, deployments_by_owner, statefulsets_by_owner, jobs_by_owner)
    pods = list(pods_by_owner.get(key, ()))

    def work() -> None:
        outcome = reconcile(memo.kube, owner, ref.spec, ref.generation, memo.settings, existing)
        model = observe_model(memo.kube, owner, spec, existing.jobs)
        write_outcome(memo.kube, owner, outcome, pods, seen(ref.resource_version, ref.status), model=model)

    await asyncio.wait_for(asyncio.to_thread(work), memo.settings.handler_timeout_seconds)


async def reconcile_handler(
    name: str,
    namespace: str | None,
    uid: str,
    spec: kopf.Spec,
    status: kopf.Status,
    meta: kopf.Meta,
    memo: kopf.Memo,
    pods_by_owner: kopf.Index[Any, PodSummary] | None = None,  # kopf passes indices by name
    pdbs_by_owner: kopf.Index[Any, bool] | None = None,
    deployments_by_owner: kopf.Index[Any, DeploymentState] | None = None,
    statefulsets_by_owner: kopf.Index[Any, StatefulSetState] | None = None,
    jobs_by_owner: kopf.Index[Any, JobState] | None = None,
    **_: Any,
) -> None:
    assert pods_by_owner is not None and pdbs_by_owner is not None and jobs_by_owner is not None
    assert deployments_by_owner is not None and statefulsets_by_owner is not None
    assert namespace is not None  # the CRD is namespaced
    owner = Owner(name=name, namespace=namespace, uid=uid)
    indices = (pdbs_by_owner, deployments_by_owner, statefulsets_by_owner, jobs_by_owner)
    existing = Existing.from_indices((namespace, name), *indices)

    generation = int(meta.get("generation", 0))
    async with memo.write_priority.reconcile():
        outcome = await asyncio.to_thread(reconcile, memo.kube, owner, spec, generation, memo.settings, existing)
    # The verdict (observedGeneration, Degraded) is a status write too: after a burst's reconciles, like the others.
    await memo.write_priority.refresh_turn()
    pods = list(pods_by_owner.get((namespace, name), ()))
    last_seen = seen(meta.get("resourceVersion"), status)
    await asyncio.to_thread(write_outcome, memo.kube, owner, outcome, pods, last_seen)
    if outcome.error is not None:
        # Not retried by kopf: the status shows it, and the periodic resync (or the next spec change) tries again.
        raise kopf.PermanentError(f"invalid spec: {outcome.error}" if outcome.invalid_spec else outcome.error)


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
    on.startup(id="start_loop", retries=1, backoff=1.0, timeout=10.0, registry=registry)(start_loop)
    on.login(id="login", retries=3, backoff=2.0, timeout=30.0, registry=registry)(login)
    on.cleanup(id="close", retries=1, backoff=1.0, timeout=10.0, registry=registry)(close)

    kopf.index("apps", "v1", "deployments", id="deployments_by_owner", labels=_MANAGED, **quick)(deployments_by_owner)
    kopf.index("", "v1", "pods", id="pods_by_owner", labels=_RUNTIME_PODS, **quick)(pods_by_owner)
    kopf.index("batch", "v1", "jobs", id="jobs_by_owner", labels=_LOADERS, **quick)(jobs_by_owner)
    kopf.index("policy", "v1", "poddisruptionbudgets", id="pdbs_by_owner", labels=_MANAGED, **quick)(pdbs_by_owner)
    kopf.index("apps", "v1", "statefulsets", id="statefulsets_by_owner", labels=_MANAGED, **quick)(
        statefulsets_by_owner
    )
    kopf.index(*_RESOURCE, id="llmds_by_key", **quick)(llmds_by_key)

    # kopf's event handlers have no retry policy: a status refresh lost here is redone by the loop's next tick.
    for plural in ("deployments", "statefulsets"):
        on.event("apps", "v1", plural, id=f"{plural}_changed", labels=_MANAGED, registry=registry)(workload_changed)
    on.event("batch", "v1", "jobs", id="job_changed", labels=_LOADERS, registry=registry)(job_changed)
    for group, version, plural in _OWNED:
        on.event(group, version, plural, id=f"drift_{plural}", labels=_MANAGED, registry=registry)(owned_changed)
    for decorator in (on.resume, on.create, on.update):
        decorator(*_RESOURCE, id="reconcile", **policy)(reconcile_handler)

"""The fleet loop: one operator-level asyncio task over kopf's LLMDeployment index, every few seconds.

    for each LLMDeployment in the index (kept by watches; nothing is read from the API server):
        every resync_seconds      reconcile again, whatever happened (no object is left unreconciled)
        every evaluation period   scrape its Ready pods -> decide -> /scale + Event   (scaling.autoscale)
        every tick                status from the Deployment and pods indices, written only when it changed

A kopf timer would do this per object, but a timer makes kopf put a finalizer on every LLMDeployment that
nothing removes once the operator is gone (uninstalled, scaled to zero, the namespace no longer watched): the
delete would hang. This loop needs no finalizer. With kopf peering, only the leading peer's loop acts.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kubellm.operator import constants as c
from kubellm.operator.apply import Kube
from kubellm.operator.autoscaler import wake_replicas
from kubellm.operator.gateway_load import GatewayLoad
from kubellm.operator.group_restart import group_actions
from kubellm.operator.groups import workload_state
from kubellm.operator.metrics import Scraper
from kubellm.operator.model_cache import JobState, find_job, model_status, parse_progress, termination_message
from kubellm.operator.peering import Leadership
from kubellm.operator.priority import WritePriority
from kubellm.operator.reconcile import Existing, parse_or_error, reconcile
from kubellm.operator.resources import Owner
from kubellm.operator.scaling import AutoscaleMemory, PostEvent, autoscale
from kubellm.operator.settings import Settings
from kubellm.operator.spec import LLMDeploymentSpec, ModelStatus
from kubellm.operator.status import PodSummary, ScalingReport, metrics_due, parse_status, serving_pods
from kubellm.operator.status_writes import now_iso, seen, write_outcome, write_refresh

log = logging.getLogger("kubellm.operator.loop")


@dataclass
class ObjectMemory:
    """Loop state of one LLMDeployment (by uid), in memory."""

    autoscale: AutoscaleMemory = field(default_factory=AutoscaleMemory)
    last_resync: float = field(default_factory=time.monotonic)
    # A report with a scaling decision whose status write failed: written with the next tick, never lost.
    pending: ScalingReport | None = None
    # A failed loader Job's cause, by the Job's uid: read once from its pods, not every tick.
    loader_failures: dict[str, str] = field(default_factory=dict)


def one(store: Iterable[Any] | None) -> Any | None:
    for item in store or ():
        return item
    return None


def observe_model(
    kube: Kube,
    owner: Owner,
    spec: LLMDeploymentSpec,
    jobs: Iterable[JobState],
    failures: dict[str, str] | None = None,
) -> ModelStatus:
    """The model cache now: the loader Job's state, with the progress its running pod last logged, or the cause
    its failed pod left in its termination message (blocking calls: run it in a thread). ``failures`` remembers a
    failed Job's cause by uid (a failed Job is final; one deleted and made again has a new uid)."""
    job = find_job(list(jobs), owner, spec)
    if failures is not None and (job is None or not job.failed):
        failures.clear()
    if job is not None and job.failed and failures is not None and job.uid in failures:
        return model_status(spec, job, None, failures[job.uid])
    progress, cause = None, None
    if job is not None and not job.complete:
        pods = kube.list("v1", "Pod", owner.namespace, f"{c.LABEL_JOB_NAME}={job.name}")
        if job.failed:
            cause = termination_message(pods)
            if failures is not None and job.uid and cause is not None:
                failures[job.uid] = cause
        running = [p for p in pods if (p.get("status") or {}).get("phase") == "Running"]
        if running:
            try:
                progress = parse_progress(kube.pod_log_tail(owner.namespace, running[0]["metadata"]["name"]))
            except Exception as exc:  # no log yet, or no kubelet to ask: the phase alone then
                log.debug("reading the loader's log of %s failed: %s", owner.name, exc)
    return model_status(spec, job, progress, cause)


@dataclass
class FleetLoop:
    settings: Settings
    kube: Kube
    scraper: Scraper
    leadership: Leadership
    # kopf indices (key -> a store of values), live views kept by the watches.
    llmds: Mapping[Any, Any]
    pods: Mapping[Any, Any]
    deployments: Mapping[Any, Any]
    pdbs: Mapping[Any, Any]
    statefulsets: Mapping[Any, Any]
    jobs: Mapping[Any, Any]
    priority: WritePriority = field(default_factory=WritePriority)
    gateway: GatewayLoad | None = None  # the gateways' held requests (settings.gateway_metrics_urls)
    memory: dict[str, ObjectMemory] = field(default_factory=dict)

    async def run(self) -> None:
        while True:
            started = time.monotonic()
            if self.leadership.peering:
                await self.read_peering()
            if self.leadership.active():
                await self.tick()
            await asyncio.sleep(max(0.05, self.settings.timer_interval_seconds - (time.monotonic() - started)))

    async def read_peering(self) -> None:
        """kopf's peering objects, as kopf's own peering reads them (a kopf handler on them would disturb kopf's
        watch of the same resource): cluster-wide one object, namespaced one per namespace in use."""
        name = self.settings.peering
        try:
            if not self.settings.namespaces:
                found = await asyncio.to_thread(self.kube.get_peering, None, name)
                self.leadership.observe(("", name), (found or {}).get("status") if found else None)
                return
            for namespace in sorted({key[0] for key in list(self.llmds)}):
                found = await asyncio.to_thread(self.kube.get_peering, namespace, name)
                self.leadership.observe((namespace, name), (found or {}).get("status") if found else None)
        except Exception as exc:  # unknown: stand by until it is known again
            log.warning("reading the peering object %s failed: %s", name, exc)
            self.leadership.peers.clear()

    async def tick(self) -> None:
        await self.priority.refresh_turn()  # a burst's reconciles first
        refs = [(key, ref) for key, store in list(self.llmds.items()) if (ref := one(store)) is not None]
        for uid in set(self.memory) - {ref.uid for _, ref in refs}:
            del self.memory[uid]  # deleted: its loop state goes with it
        self.kube.forget_except({key for key, _ in refs})
        held = await self.gateway.held() if self.gateway is not None else {}
        results = await asyncio.gather(
            *(self.refresh(key, ref, held.get(key, 0.0)) for key, ref in refs), return_exceptions=True
        )
        for (key, _), result in zip(refs, results, strict=True):
            if isinstance(result, Exception):
                log.warning("refreshing %s/%s failed: %s", key[0], key[1], result)

    def _post_event(self, owner: Owner) -> PostEvent:
        involved = {
            "apiVersion": c.API_VERSION,
            "kind": c.KIND,
            "metadata": {"name": owner.name, "namespace": owner.namespace, "uid": owner.uid},
        }

        async def post(type_: str, reason: str, message: str) -> None:
            try:
                await asyncio.to_thread(self.kube.post_event, involved, type_, reason, message, now_iso())
            except Exception as exc:  # an Event is best effort: never a reason to stop scaling
                log.warning("posting the %s event on %s failed: %s", reason, owner.name, exc)

        return post

    async def wake(self, owner: Owner, spec: LLMDeploymentSpec, held: int, resource_version: str) -> None:
        """The documented 0 -> 1 signal: the wake annotation. Scale up if at 0 (to wake_replicas), then remove
        the annotations."""
        if spec.replicas == 0:
            target = wake_replicas(spec.autoscaling, held)
            args = (owner.namespace, owner.name, 0, target, resource_version)
            if await asyncio.to_thread(self.kube.scale_if, *args):
                why = f", {held} requests held at the gateway" if held else ""
                message = f"woken by {c.ANNOTATION_WAKE}{why}: 0 -> {target}"
                await self._post_event(owner)("Normal", "ScaledUp", message)
        for key in (c.ANNOTATION_WAKE, c.ANNOTATION_WAKE_HELD):
            await asyncio.to_thread(self.kube.clear_annotation, owner.namespace, owner.name, key)

    async def restart_groups(self, owner: Owner, pods: list[PodSummary], nodes: int) -> None:
        """Multi-node replicas: record which workers joined which rank 0, and restart a group that lost a member
        (group_restart.py)."""
        ns = owner.namespace
        for action in group_actions(pods, nodes):
            if action.action == "delete":
                if await asyncio.to_thread(self.kube.delete, "v1", "Pod", ns, action.pod, action.uid):
                    log.info("%s/%s: deleted pod %s: %s", owner.namespace, owner.name, action.pod, action.reason)
                    if action.restarts_group:
                        message = f"restarting the replica group of {action.pod}: {action.reason}"
                        await self._post_event(owner)("Warning", "GroupRestarted", message)
                continue
            if action.action == "stamp":
                note = {c.ANNOTATION_GROUP_LEADER: action.leader}
            else:
                note = {c.ANNOTATION_GROUP_COMPLETE: "true"}
            await asyncio.to_thread(self.kube.annotate, "v1", "Pod", ns, action.pod, action.uid, note)

    async def refresh(self, key: tuple[str, str], ref: Any, held: float = 0.0) -> None:
        namespace, name = key
        spec, _error = parse_or_error(ref.spec)
        if spec is None or ref.deleting:
            return  # the reconcile handler reported an invalid spec
        owner = Owner(name=name, namespace=namespace, uid=ref.uid)
        memory = self.memory.setdefault(ref.uid, ObjectMemory())
        pods: list[PodSummary] = list(self.pods.get(key, ()))
        last_seen = seen(ref.resource_version, ref.status)
        clock = time.monotonic()
        if clock - memory.last_resync >= self.settings.resync_seconds:
            memory.last_resync = clock
            existing = Existing.from_indices(key, self.pdbs, self.deployments, self.statefulsets, self.jobs)
            args = (self.kube, owner, ref.spec, ref.generation, self.settings, existing)
            outcome = await asyncio.to_thread(reconcile, *args)
            await asyncio.to_thread(write_outcome, self.kube, owner, outcome, pods, last_seen)
            return  # the next tick refreshes from the status just written
        if ref.wake:
            await self.wake(owner, spec, ref.wake_held, ref.resource_version)
            return  # the next tick sees the new replicas
        if spec.nodes() > 1:
            await self.restart_groups(owner, pods, spec.nodes())
        report = None
        auto, auto_memory = spec.autoscaling, memory.autoscale
        if auto.enabled and clock - auto_memory.last_evaluation >= auto.evaluation_period_seconds - 0.05:
            auto_memory.last_evaluation = clock
            report, spec = await autoscale(
                post_event=self._post_event(owner),
                owner=owner,
                spec=spec,
                pods=serving_pods(pods, spec.nodes()),  # one per replica: a group's rank 0 speaks for it
                memory=auto_memory,
                stored=list(parse_status(ref.status).recommendations),
                resource_version=ref.resource_version,
                kube=self.kube,
                scraper=self.scraper,
                logger=log,
                now=now_iso(),
                held=held,
            )
            previous = parse_status(ref.status).metrics
            interval = self.settings.metrics_status_interval_seconds
            if report.metrics is not None and not metrics_due(previous, report.metrics, interval):
                report = dataclasses.replace(report, metrics=None)  # rate-limited: the last snapshot stands
        pending = memory.pending
        if pending is not None and report is not None:
            # The decision and the metrics it was made on go out together; this tick's metrics follow next time.
            report = dataclasses.replace(
                report,
                decision=report.decision or pending.decision,
                scale_time=report.scale_time or pending.scale_time,
                metrics=pending.metrics or report.metrics,
            )
        elif pending is not None:
            report = pending
        deployment = workload_state(spec, key, self.deployments, self.statefulsets)
        model = None
        if spec.storage.model_cache is not None:
            try:
                jobs = self.jobs.get(key, ())
                model = await asyncio.to_thread(observe_model, self.kube, owner, spec, jobs, memory.loader_failures)
            except Exception as exc:  # status.model stays as it was; the write (a scaling decision's) must not wait
                log.warning("%s/%s: reading the model cache's loader failed: %s", namespace, name, exc)
        args2 = (self.kube, owner, ref.generation, spec, deployment, pods, last_seen, report)
        try:
            await asyncio.to_thread(functools.partial(write_refresh, *args2, model=model))
        except Exception:
            if report is not None and report.decision is not None:
                memory.pending = report
            raise
        memory.pending = None

"""PURE: what the LLMDeployment's status says, from what its Deployment and pods say.

The status is built as the typed `LLMDeploymentStatus` (spec.py, the same model the CRD's status schema comes
from), one function per condition. Conditions follow the Kubernetes API conventions: one entry per type, a
CamelCase reason and a message, `lastTransitionTime` moving only when the status flips, `observedGeneration` the
spec generation the condition was computed from.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import pydantic

from kubellm.operator import constants as c
from kubellm.operator.resources import Owner, endpoint, selector_string
from kubellm.operator.spec import (
    Condition,
    LLMDeploymentSpec,
    LLMDeploymentStatus,
    MetricsSnapshot,
    ModelStatus,
    RecommendationSegment,
    ScalingDecisionRecord,
)

JSON = dict[str, Any]
# Degraded reasons only a reconcile sets and clears (the other status writers carry them over): the spec could not
# be used, or the API server refused an object it renders to.
RECONCILE_REASONS = frozenset({"InvalidSpec", "ApplyFailed"})
# Waiting reasons that mean the pod will not come up on its own.
BROKEN_WAITING_REASONS = frozenset(
    {"CrashLoopBackOff", "ImagePullBackOff", "ErrImagePull", "CreateContainerConfigError", "InvalidImageName"}
)


@dataclass(frozen=True)
class PodSummary:
    """What the operator needs to know about one runtime pod (kept in a kopf index, so small)."""

    name: str
    ip: str | None
    ready: bool
    terminating: bool
    # Pending and the scheduler found no node: its message ("0/3 nodes are available: 3 Insufficient ...").
    unschedulable_message: str | None = None
    broken_reason: str | None = None  # e.g. CrashLoopBackOff
    # A pod of a multi-node replica group (groups.py, group_restart.py): which group, its rank (the StatefulSet
    # ordinal), the rank-0 pod it joined (workers), whether all its workers had joined (rank 0).
    uid: str = ""
    group: str | None = None
    rank: int | None = None
    leader: str | None = None
    complete: bool = False


def summarize_pod(pod: Mapping[str, Any]) -> PodSummary:
    meta, status = pod.get("metadata", {}), pod.get("status", {}) or {}
    conditions = {cond.get("type"): cond for cond in status.get("conditions") or []}
    ready = conditions.get("Ready", {}).get("status") == "True"
    unschedulable = None
    scheduled = conditions.get("PodScheduled", {})
    pending = status.get("phase") == "Pending" and scheduled.get("status") == "False"
    if pending and scheduled.get("reason") == "Unschedulable":
        unschedulable = scheduled.get("message") or "Unschedulable"
    broken = None
    for cs in status.get("containerStatuses") or []:
        reason = ((cs.get("state") or {}).get("waiting") or {}).get("reason")
        if reason in BROKEN_WAITING_REASONS:
            broken = reason
    labels, annotations = meta.get("labels") or {}, meta.get("annotations") or {}
    index = str(labels.get(c.LABEL_POD_INDEX, ""))
    return PodSummary(
        name=meta.get("name", ""),
        ip=status.get("podIP"),
        ready=ready,
        terminating=meta.get("deletionTimestamp") is not None,
        unschedulable_message=unschedulable,
        broken_reason=broken,
        uid=str(meta.get("uid", "")),
        group=labels.get(c.LABEL_GROUP),
        rank=int(index) if index.isdigit() else None,
        leader=annotations.get(c.ANNOTATION_GROUP_LEADER),
        complete=c.ANNOTATION_GROUP_COMPLETE in annotations,
    )


@dataclass(frozen=True)
class DeploymentState:
    """The observed part of the Deployment the operator applied."""

    generation: int = 0
    observed_generation: int = 0
    replicas: int = 0
    ready_replicas: int = 0
    updated_replicas: int = 0
    available_replicas: int = 0
    conditions: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    @classmethod
    def from_object(cls, deployment: Mapping[str, Any]) -> DeploymentState:
        status = deployment.get("status") or {}
        return cls(
            generation=int(deployment.get("metadata", {}).get("generation", 0)),
            observed_generation=int(status.get("observedGeneration", 0)),
            replicas=int(status.get("replicas", 0)),
            ready_replicas=int(status.get("readyReplicas", 0)),
            updated_replicas=int(status.get("updatedReplicas", 0)),
            available_replicas=int(status.get("availableReplicas", 0)),
            conditions={cond["type"]: cond for cond in status.get("conditions") or [] if "type" in cond},
        )

    def rolled_out(self, desired: int) -> bool:
        return (
            self.observed_generation >= self.generation
            and self.updated_replicas >= desired
            and self.replicas <= desired
            and self.available_replicas >= desired
        )


@dataclass(frozen=True)
class ScalingReport:
    """The autoscaling loop's latest outcome, as the status shows it."""

    active: bool
    reason: str
    message: str
    limited: str | None = None  # the decision was held below the load's ask (e.g. at maxReplicas)
    metrics: MetricsSnapshot | None = None  # status.metrics
    decision: ScalingDecisionRecord | None = None  # a new status.scalingDecisions entry, when replicas changed
    scale_time: str | None = None
    history: Sequence[RecommendationSegment] | None = None  # status.recommendations (None: leave as it is)


def serving_pods(pods: Sequence[PodSummary], nodes: int) -> list[PodSummary]:
    """The pods that serve the API, one per replica: all of them, or each multi-node group's rank 0 (ready only
    once every rank of its group joined)."""
    return [p for p in pods if nodes <= 1 or (p.group is not None and p.rank == 0)]


@dataclass(frozen=True)
class Observed:
    """What the status is computed from: the workload (the Deployment, or the groups' StatefulSets as one
    Deployment-like state counted in groups) and the pods, as the watches last saw them."""

    deployment: DeploymentState | None
    pods: Sequence[PodSummary]
    nodes: int = 1  # pods per replica

    @property
    def live(self) -> list[PodSummary]:
        return [p for p in self.pods if not p.terminating]

    @property
    def replicas(self) -> int:
        """Replicas that exist: pods, or groups with a live pod."""
        if self.nodes <= 1:
            return len(self.live)
        return len({p.group for p in self.live if p.group is not None})

    @property
    def ready(self) -> int:
        return sum(p.ready for p in serving_pods(self.live, self.nodes))

    @property
    def unschedulable(self) -> list[PodSummary]:
        return [p for p in self.live if p.unschedulable_message]

    @property
    def broken(self) -> list[PodSummary]:
        return [p for p in self.live if p.broken_reason]


def condition(type_: str, ok: bool | None, reason: str, message: str) -> Condition:
    status = "Unknown" if ok is None else "True" if ok else "False"
    return Condition(type=type_, status=status, reason=reason, message=message[:4096])


def parse_status(raw: Mapping[str, Any] | None) -> LLMDeploymentStatus:
    """The stored status as the typed model; fields this version does not know (or cannot read) are dropped."""
    known = {f.alias or name for name, f in LLMDeploymentStatus.model_fields.items()}
    data = {k: v for k, v in (raw or {}).items() if k in known and v is not None}
    try:
        return LLMDeploymentStatus.model_validate(data)
    except pydantic.ValidationError:
        keep = {k: v for k, v in data.items() if k not in ("metrics", "scalingDecisions", "conditions")}
        return LLMDeploymentStatus.model_validate(keep)


def previous_condition(previous: LLMDeploymentStatus, type_: str) -> Condition | None:
    return next((cond for cond in previous.conditions if cond.type == type_), None)


def carried_error(previous: LLMDeploymentStatus) -> Condition | None:
    """The last reconcile's failure, which stands until a reconcile succeeds (whatever the pods do meanwhile)."""
    old = previous_condition(previous, c.CONDITION_DEGRADED)
    return old if old is not None and old.status == "True" and old.reason in RECONCILE_REASONS else None


def metrics_due(previous: MetricsSnapshot | None, new: MetricsSnapshot, min_interval_seconds: float) -> bool:
    """Rate limit on status.metrics: write a snapshot only when its numbers moved, and not more often than the
    interval (a quiet fleet writes nothing; a busy one a status per interval, not per evaluation)."""
    if previous is None:
        return True
    if previous.model_dump(exclude={"time"}) == new.model_dump(exclude={"time"}):
        return False
    try:
        elapsed = (datetime.fromisoformat(new.time) - datetime.fromisoformat(previous.time)).total_seconds()
    except ValueError:
        return True
    return elapsed >= min_interval_seconds


def merge_conditions(
    previous: Sequence[Condition], new: Sequence[Condition], generation: int, now: str
) -> list[Condition]:
    """Stamp new conditions, keeping lastTransitionTime from the previous entry when the status did not flip."""
    before = {cond.type: cond for cond in previous}
    out = []
    for cond in new:
        old = before.get(cond.type)
        flipped = old is None or old.status != cond.status
        since = now if flipped or old is None or old.last_transition_time is None else old.last_transition_time
        # Never back: a writer whose watch has not seen the newest generation yet must not stamp an older one.
        stamp = max(generation, (old.observed_generation or 0) if old is not None else 0)
        out.append(cond.model_copy(update={"observed_generation": stamp, "last_transition_time": since}))
    return out


def ready_condition(spec: LLMDeploymentSpec, observed: Observed, model: ModelStatus | None = None) -> Condition:
    desired, ready, unschedulable = spec.replicas, observed.ready, observed.unschedulable
    if model is not None and model.phase != "Ready" and desired > 0:
        reason = "ModelDownloadFailed" if model.phase == "Failed" else "ModelDownloading"
        return condition(c.CONDITION_READY, False, reason, model.message)
    if desired == 0:
        return condition(c.CONDITION_READY, False, "ScaledToZero", "spec.replicas is 0")
    if ready >= desired:
        return condition(c.CONDITION_READY, True, "AllReplicasReady", f"{ready}/{desired} replicas ready")
    if ready > 0:
        return condition(
            c.CONDITION_READY, True, "PartiallyReady", f"{ready}/{desired} replicas ready; serving with fewer"
        )
    why = f"; {len(unschedulable)} Pending: {unschedulable[0].unschedulable_message}" if unschedulable else ""
    return condition(c.CONDITION_READY, False, "ReplicasNotReady", f"0/{desired} replicas ready{why}")


def progressing_condition(spec: LLMDeploymentSpec, observed: Observed) -> Condition:
    desired, deployment = spec.replicas, observed.deployment
    deadline = (deployment or DeploymentState()).conditions.get("Progressing", {})
    if deadline.get("reason") == "ProgressDeadlineExceeded":
        return condition(c.CONDITION_PROGRESSING, False, "ProgressDeadlineExceeded", str(deadline.get("message", "")))
    if deployment is None:
        return condition(c.CONDITION_PROGRESSING, True, "Creating", "creating the Deployment")
    if deployment.rolled_out(desired):
        return condition(c.CONDITION_PROGRESSING, False, "RolloutComplete", f"{desired} replicas up to date")
    dep = deployment
    message = f"{dep.updated_replicas}/{desired} updated, {dep.available_replicas} available, {dep.replicas} pods"
    return condition(c.CONDITION_PROGRESSING, True, "RollingOut", message)


def degraded_condition(
    spec: LLMDeploymentSpec, observed: Observed, error: Condition | None, model: ModelStatus | None = None
) -> Condition:
    """`error`: the reconcile's verdict (a refused apply, an invalid spec), which outranks what the pods show."""
    if error is not None:
        return condition(c.CONDITION_DEGRADED, True, error.reason, error.message)
    if model is not None and model.phase == "Failed":
        return condition(c.CONDITION_DEGRADED, True, "DownloadFailed", model.message)
    dep = observed.deployment or DeploymentState()
    deadline = dep.conditions.get("Progressing", {})
    replica_failure = dep.conditions.get("ReplicaFailure", {})
    broken, unschedulable = observed.broken, observed.unschedulable
    if deadline.get("reason") == "ProgressDeadlineExceeded":
        return condition(c.CONDITION_DEGRADED, True, "ProgressDeadlineExceeded", str(deadline.get("message", "")))
    if replica_failure.get("status") == "True":
        reason = str(replica_failure.get("reason", "ReplicaFailure"))
        return condition(c.CONDITION_DEGRADED, True, reason, str(replica_failure.get("message", "")))
    if broken:
        reason = broken[0].broken_reason or "PodFailing"
        return condition(c.CONDITION_DEGRADED, True, reason, f"{len(broken)} pod(s): {broken[0].name}")
    if unschedulable and observed.ready < spec.replicas:
        message = f"{len(unschedulable)} pod(s) Pending: {unschedulable[0].unschedulable_message}"
        return condition(c.CONDITION_DEGRADED, True, "Unschedulable", message)
    return condition(c.CONDITION_DEGRADED, False, "AsExpected", "")


def scaling_active_condition(
    spec: LLMDeploymentSpec, previous: LLMDeploymentStatus, report: ScalingReport | None
) -> Condition:
    auto = spec.autoscaling
    if not auto.enabled:
        return condition(c.CONDITION_SCALING_ACTIVE, False, "AutoscalingDisabled", "spec.autoscaling.enabled is false")
    if auto.mode == "external":
        message = "spec.replicas is left to an external autoscaler (HPA/KEDA) through the scale subresource"
        return condition(c.CONDITION_SCALING_ACTIVE, True, "ExternalAutoscaler", message)
    if report is not None:
        return condition(c.CONDITION_SCALING_ACTIVE, report.active, report.reason, report.message)
    old = previous_condition(previous, c.CONDITION_SCALING_ACTIVE)
    if old is not None and old.reason not in ("AutoscalingDisabled", "ExternalAutoscaler"):
        return condition(c.CONDITION_SCALING_ACTIVE, old.status == "True", old.reason, old.message)
    return condition(c.CONDITION_SCALING_ACTIVE, False, "AwaitingMetrics", "no evaluation yet")


def scaling_limited_condition(
    spec: LLMDeploymentSpec, observed: Observed, previous: LLMDeploymentStatus, report: ScalingReport | None
) -> Condition:
    unschedulable = observed.unschedulable
    if unschedulable:
        message = unschedulable[0].unschedulable_message or ""
        reason = "InsufficientGPU" if f"Insufficient {spec.resources.gpu_resource_name}" in message else "Unschedulable"
        return condition(c.CONDITION_SCALING_LIMITED, True, reason, f"{len(unschedulable)} pod(s) Pending: {message}")
    if report is not None and report.limited:
        return condition(c.CONDITION_SCALING_LIMITED, True, "MaxReplicas", report.limited)
    old = previous_condition(previous, c.CONDITION_SCALING_LIMITED)
    if report is None and old is not None and old.reason == "MaxReplicas":
        # The loop's last verdict stands until its next evaluation.
        return condition(c.CONDITION_SCALING_LIMITED, old.status == "True", "MaxReplicas", old.message)
    return condition(c.CONDITION_SCALING_LIMITED, False, "NotLimited", "")


def compute_status(
    *,
    owner: Owner,
    generation: int,
    spec: LLMDeploymentSpec,
    observed: Observed,
    previous: LLMDeploymentStatus,
    now: str,
    error: Condition | None = None,
    scaling: ScalingReport | None = None,
    applied_generation: int | None = None,
    model: ModelStatus | None = None,
) -> LLMDeploymentStatus:
    """The whole status (the operator owns all of it). `generation`: the spec generation the conditions were
    computed from; `applied_generation`: the last generation applied in full (status.observedGeneration, which
    never advances for a generation that was not applied). `model`: the model cache's state now (None: as the
    previous status has it; without storage.modelCache there is none)."""
    if spec.storage.model_cache is None:
        model = None
    elif model is None or model.source != spec.model.source:
        same = previous.model is not None and previous.model.source == spec.model.source
        model = previous.model if same else ModelStatus(phase="Pending", source=spec.model.source)
    new_conditions = [
        ready_condition(spec, observed, model),
        progressing_condition(spec, observed),
        degraded_condition(spec, observed, error, model),
        scaling_active_condition(spec, previous, scaling),
        scaling_limited_condition(spec, observed, previous, scaling),
    ]
    decisions = list(previous.scaling_decisions)
    metrics, last_scale = previous.metrics, previous.last_scale_time
    if scaling is not None and scaling.metrics is not None:
        metrics = scaling.metrics
    if scaling is not None and scaling.decision is not None:
        decisions = [*decisions, scaling.decision][-c.MAX_SCALING_DECISIONS :]
        last_scale = scaling.scale_time
    history = list(previous.recommendations)
    if scaling is not None and scaling.history is not None:
        history = list(scaling.history)
    dep = observed.deployment or DeploymentState()
    return LLMDeploymentStatus(
        observed_generation=applied_generation,
        conditions=merge_conditions(previous.conditions, new_conditions, generation, now),
        replicas=observed.replicas,
        ready_replicas=observed.ready,
        updated_replicas=dep.updated_replicas,
        desired_replicas=spec.replicas,
        pending_replicas=len(observed.unschedulable),
        ready=f"{observed.ready}/{spec.replicas}",
        selector=selector_string(owner.name, spec),
        endpoint=endpoint(owner, spec),
        metrics=metrics,
        model=model,
        last_scale_time=last_scale,
        scaling_decisions=decisions,
        recommendations=history,
    )


def to_json(status: LLMDeploymentStatus) -> JSON:
    return status.model_dump(mode="json", by_alias=True, exclude_none=True)


def build_status(
    *,
    owner: Owner,
    generation: int,
    spec: LLMDeploymentSpec,
    deployment: DeploymentState | None,
    pods: Sequence[PodSummary],
    previous: Mapping[str, Any],
    now: str,
    error: str | None = None,
    scaling: ScalingReport | None = None,
    applied: bool = False,
    model: ModelStatus | None = None,
) -> JSON:
    """`compute_status` from and to the JSON the API server stores (what the handlers read and write).

    applied: a reconcile just applied `generation` in full (observedGeneration moves to it, a carried reconcile
    failure clears). error: a reconcile's failure to apply (Degraded=True/ApplyFailed with the API server's
    message). Neither: the previous reconcile's verdict and observedGeneration stand."""
    before = parse_status(previous)
    failure = None if applied else carried_error(before)
    if error is not None:
        failure = condition(c.CONDITION_DEGRADED, True, "ApplyFailed", error)
    return to_json(
        compute_status(
            owner=owner,
            generation=generation,
            spec=spec,
            observed=Observed(deployment, pods, spec.nodes()),
            previous=before,
            now=now,
            error=failure,
            scaling=scaling,
            applied_generation=generation if applied else before.observed_generation,
            model=model,
        )
    )


def invalid_spec_status(previous: Mapping[str, Any], generation: int, error: str, now: str) -> JSON:
    """A spec the operator cannot use (one the CRD schema could not refuse): only Degraded changes (the generation
    was not applied, so observedGeneration stays where it was)."""
    before = parse_status(previous)
    degraded = condition(c.CONDITION_DEGRADED, True, "InvalidSpec", error)
    others = [cond for cond in before.conditions if cond.type != c.CONDITION_DEGRADED]
    merged = merge_conditions(before.conditions, [degraded], generation, now)
    return to_json(before.model_copy(update={"conditions": [*others, *merged]}))


def status_patch(previous: Mapping[str, Any], new: Mapping[str, Any]) -> JSON:
    """A JSON merge patch turning `previous` into `new` at the top level ({} when nothing changed: write nothing)."""
    patch: JSON = {k: v for k, v in new.items() if previous.get(k) != v}
    for key in previous:
        if key not in new and previous[key] is not None and not key.startswith("kopf"):
            patch[key] = None
    return patch

"""PURE: what the LLMDeployment's status says, from what its Deployment and pods say.

Conditions follow the Kubernetes conventions: one entry per type, `lastTransitionTime` moves only when the
status flips, `observedGeneration` records the spec generation the condition was computed from.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kubellm.operator import constants as c
from kubellm.operator.resources import Owner, endpoint, selector_string
from kubellm.operator.spec import LLMDeploymentSpec

JSON = dict[str, Any]
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
    return PodSummary(
        name=meta.get("name", ""),
        ip=status.get("podIP"),
        ready=ready,
        terminating=meta.get("deletionTimestamp") is not None,
        unschedulable_message=unschedulable,
        broken_reason=broken,
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


@dataclass(frozen=True)
class ScalingReport:
    """The autoscaling loop's latest outcome, as the status shows it."""

    active: bool
    reason: str
    message: str
    limited: str | None = None  # the decision was held below the load's ask (e.g. at maxReplicas)
    metrics: JSON | None = None  # status.metrics
    decision: JSON | None = None  # a new status.scalingDecisions entry, when replicas changed
    scale_time: str | None = None


def condition(type_: str, ok: bool | None, reason: str, message: str) -> JSON:
    status = "Unknown" if ok is None else "True" if ok else "False"
    return {"type": type_, "status": status, "reason": reason, "message": message}


def merge_conditions(
    previous: Iterable[Mapping[str, Any]], new: Sequence[JSON], generation: int, now: str
) -> list[JSON]:
    """Stamp new conditions, keeping lastTransitionTime from the previous entry when the status did not flip."""
    before = {cond.get("type"): cond for cond in previous}
    out = []
    for cond in new:
        old = before.get(cond["type"])
        flipped = old is None or old.get("status") != cond["status"]
        stamped = {**cond, "observedGeneration": generation}
        stamped["lastTransitionTime"] = now if flipped or old is None else old.get("lastTransitionTime", now)
        out.append(stamped)
    return out


def _scaling_conditions(spec: LLMDeploymentSpec, previous: Mapping[str, Any], report: ScalingReport | None) -> JSON:
    auto = spec.autoscaling
    if not auto.enabled:
        return condition(c.CONDITION_SCALING_ACTIVE, False, "AutoscalingDisabled", "spec.autoscaling.enabled is false")
    if auto.mode == "external":
        return condition(
            c.CONDITION_SCALING_ACTIVE,
            True,
            "ExternalAutoscaler",
            "spec.replicas is left to an external autoscaler (HPA/KEDA) through the scale subresource",
        )
    if report is not None:
        return condition(c.CONDITION_SCALING_ACTIVE, report.active, report.reason, report.message)
    for cond in previous.get("conditions") or []:
        if cond.get("type") == c.CONDITION_SCALING_ACTIVE and cond.get("reason") not in (
            "AutoscalingDisabled",
            "ExternalAutoscaler",
        ):
            return condition(c.CONDITION_SCALING_ACTIVE, cond.get("status") == "True", cond["reason"], cond["message"])
    return condition(c.CONDITION_SCALING_ACTIVE, False, "AwaitingMetrics", "no evaluation yet")


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
) -> JSON:
    """The whole status (as the operator owns all of it). `previous` is the current status, for carry-overs."""
    desired = spec.replicas
    live = [p for p in pods if not p.terminating]
    ready = sum(p.ready for p in live)
    unschedulable = [p for p in live if p.unschedulable_message]
    broken = [p for p in live if p.broken_reason]
    dep = deployment or DeploymentState()
    rolled_out = (
        deployment is not None
        and dep.observed_generation >= dep.generation
        and dep.updated_replicas >= desired
        and dep.replicas <= desired
        and dep.available_replicas >= desired
    )

    if desired == 0:
        ready_cond = condition(c.CONDITION_READY, False, "ScaledToZero", "spec.replicas is 0")
    elif ready >= desired:
        ready_cond = condition(c.CONDITION_READY, True, "AllReplicasReady", f"{ready}/{desired} replicas ready")
    elif ready > 0:
        ready_cond = condition(
            c.CONDITION_READY, True, "PartiallyReady", f"{ready}/{desired} replicas ready; serving with fewer"
        )
    else:
        why = f"; {len(unschedulable)} Pending: {unschedulable[0].unschedulable_message}" if unschedulable else ""
        ready_cond = condition(c.CONDITION_READY, False, "ReplicasNotReady", f"0/{desired} replicas ready{why}")

    deadline = dep.conditions.get("Progressing", {})
    if deadline.get("reason") == "ProgressDeadlineExceeded":
        progressing = condition(
            c.CONDITION_PROGRESSING, False, "ProgressDeadlineExceeded", str(deadline.get("message", ""))
        )
    elif deployment is None:
        progressing = condition(c.CONDITION_PROGRESSING, True, "Creating", "creating the Deployment")
    elif rolled_out:
        progressing = condition(c.CONDITION_PROGRESSING, False, "RolloutComplete", f"{desired} replicas up to date")
    else:
        progressing = condition(
            c.CONDITION_PROGRESSING,
            True,
            "RollingOut",
            f"{dep.updated_replicas}/{desired} updated, {dep.available_replicas} available, {dep.replicas} pods",
        )

    replica_failure = dep.conditions.get("ReplicaFailure", {})
    if error is not None:
        degraded = condition(c.CONDITION_DEGRADED, True, "ReconcileError", error)
    elif deadline.get("reason") == "ProgressDeadlineExceeded":
        degraded = condition(c.CONDITION_DEGRADED, True, "ProgressDeadlineExceeded", str(deadline.get("message", "")))
    elif replica_failure.get("status") == "True":
        degraded = condition(
            c.CONDITION_DEGRADED,
            True,
            str(replica_failure.get("reason", "ReplicaFailure")),
            replica_failure.get("message", ""),
        )
    elif broken:
        degraded = condition(
            c.CONDITION_DEGRADED,
            True,
            broken[0].broken_reason or "PodFailing",
            f"{len(broken)} pod(s): {broken[0].name}",
        )
    elif unschedulable and ready < desired:
        degraded = condition(
            c.CONDITION_DEGRADED,
            True,
            "Unschedulable",
            f"{len(unschedulable)} pod(s) Pending: {unschedulable[0].unschedulable_message}",
        )
    else:
        degraded = condition(c.CONDITION_DEGRADED, False, "AsExpected", "")

    gpu = spec.resources.gpu_resource_name
    previous_limit = _previous_condition(previous, c.CONDITION_SCALING_LIMITED)
    if unschedulable:
        message = unschedulable[0].unschedulable_message or ""
        reason = "InsufficientGPU" if f"Insufficient {gpu}" in message else "Unschedulable"
        limited_cond = condition(
            c.CONDITION_SCALING_LIMITED, True, reason, f"{len(unschedulable)} pod(s) Pending: {message}"
        )
    elif scaling is not None and scaling.limited:
        limited_cond = condition(c.CONDITION_SCALING_LIMITED, True, "MaxReplicas", scaling.limited)
    elif scaling is None and previous_limit.get("reason") == "MaxReplicas":
        # The timer's last verdict stands until its next evaluation.
        limited_cond = condition(
            c.CONDITION_SCALING_LIMITED,
            previous_limit.get("status") == "True",
            "MaxReplicas",
            previous_limit["message"],
        )
    else:
        limited_cond = condition(c.CONDITION_SCALING_LIMITED, False, "NotLimited", "")

    new_conditions = [ready_cond, progressing, degraded, _scaling_conditions(spec, previous, scaling), limited_cond]
    status: JSON = {
        "observedGeneration": generation,
        "conditions": merge_conditions(previous.get("conditions") or [], new_conditions, generation, now),
        "replicas": len(live),
        "readyReplicas": ready,
        "updatedReplicas": dep.updated_replicas,
        "desiredReplicas": desired,
        "pendingReplicas": len(unschedulable),
        "ready": f"{ready}/{desired}",
        "selector": selector_string(owner.name),
        "endpoint": endpoint(owner, spec),
        "metrics": previous.get("metrics"),
        "lastScaleTime": previous.get("lastScaleTime"),
        "scalingDecisions": list(previous.get("scalingDecisions") or []),
    }
    if scaling is not None and scaling.metrics is not None:
        status["metrics"] = scaling.metrics
    if scaling is not None and scaling.decision is not None:
        status["scalingDecisions"] = [*status["scalingDecisions"], scaling.decision][-c.MAX_SCALING_DECISIONS :]
        status["lastScaleTime"] = scaling.scale_time
    return {k: v for k, v in status.items() if v is not None}


def invalid_spec_status(previous: Mapping[str, Any], generation: int, error: str, now: str) -> JSON:
    """A spec the operator cannot use (one the CRD schema could not refuse): only Degraded changes."""
    others = [cond for cond in previous.get("conditions") or [] if cond.get("type") != c.CONDITION_DEGRADED]
    degraded = condition(c.CONDITION_DEGRADED, True, "InvalidSpec", error)
    merged = merge_conditions(previous.get("conditions") or [], [degraded], generation, now)
    return {**previous, "observedGeneration": generation, "conditions": [*others, *merged]}


def _previous_condition(previous: Mapping[str, Any], type_: str) -> Mapping[str, Any]:
    for cond in previous.get("conditions") or []:
        if cond.get("type") == type_:
            return cond
    return {}


def status_patch(previous: Mapping[str, Any], new: Mapping[str, Any]) -> JSON:
    """A JSON merge patch turning `previous` into `new` at the top level ({} when nothing changed: write nothing)."""
    patch: JSON = {k: v for k, v in new.items() if previous.get(k) != v}
    for key in previous:
        if key not in new and previous[key] is not None and not key.startswith("kopf"):
            patch[key] = None
    return patch

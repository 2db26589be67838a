"""The ways the status gets written, all through Kube.update_status (resourceVersion-checked, recomputed on 409).

after a reconcile        write_outcome   observedGeneration and the reconcile's verdict (Degraded)
a Deployment event       write_refresh   readiness at once (scaling keys left to the loop)
the fleet loop's tick    write_refresh   readiness, the autoscaler's report when it evaluated, the model cache
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from kubellm.operator.apply import Kube
from kubellm.operator.reconcile import ReconcileOutcome
from kubellm.operator.resources import Owner
from kubellm.operator.spec import LLMDeploymentSpec, ModelStatus
from kubellm.operator.status import (
    DeploymentState,
    PodSummary,
    ScalingReport,
    build_status,
    invalid_spec_status,
    status_patch,
)

JSON = dict[str, Any]
# Status keys only the fleet loop writes (its autoscaler's); the other writers leave them alone.
SCALING_KEYS = ("metrics", "lastScaleTime", "scalingDecisions", "recommendations")


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def seen(resource_version: Any, status: Any) -> JSON:
    """An LLMDeployment as a watch delivered it, reduced to what Kube.update_status needs."""
    return {"metadata": {"resourceVersion": str(resource_version or "")}, "status": dict(status or {})}


def without_scaling(status: Mapping[str, Any]) -> JSON:
    return {k: v for k, v in status.items() if k not in SCALING_KEYS}


def write_outcome(
    kube: Kube,
    owner: Owner,
    outcome: ReconcileOutcome,
    pods: Sequence[PodSummary],
    last_seen: JSON,
    model: ModelStatus | None = None,
) -> bool:
    """The status after a reconcile: observedGeneration advances only if the generation was applied; a failure
    shows in Degraded with the API server's message until a reconcile succeeds."""
    now = now_iso()
    generation, spec = outcome.generation, outcome.spec

    def compute(current: JSON) -> JSON:
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
            model=model,
        )
        return status_patch(without_scaling(current), without_scaling(new))

    return kube.update_status(owner.namespace, owner.name, last_seen, compute)


def write_refresh(
    kube: Kube,
    owner: Owner,
    generation: int,
    spec: LLMDeploymentSpec,
    deployment: DeploymentState | None,
    pods: Sequence[PodSummary],
    last_seen: JSON,
    scaling: ScalingReport | None = None,
    with_scaling_keys: bool = True,
    model: ModelStatus | None = None,
) -> bool:
    """The status from what the watches show now (the last reconcile's verdict carried over); nothing is written
    when nothing changed."""
    now = now_iso()

    def compute(current: JSON) -> JSON:
        new = build_status(
            owner=owner,
            generation=generation,
            spec=spec,
            deployment=deployment,
            pods=pods,
            previous=current,
            now=now,
            scaling=scaling,
            model=model,
        )
        if with_scaling_keys:
            return status_patch(current, new)
        return status_patch(without_scaling(current), without_scaling(new))

    return kube.update_status(owner.namespace, owner.name, last_seen, compute)

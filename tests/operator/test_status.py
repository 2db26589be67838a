"""status.py: conditions from the Deployment's and pods' state (pure), and KUBELLM_* settings failing fast."""

from __future__ import annotations

from typing import Any

import pytest

from kubellm.operator.resources import Owner
from kubellm.operator.settings import Settings, SettingsError
from kubellm.operator.spec import LLMDeploymentSpec, MetricsSnapshot, ScalingDecisionRecord
from kubellm.operator.status import (
    DeploymentState,
    PodSummary,
    ScalingReport,
    build_status,
    invalid_spec_status,
    metrics_due,
    status_patch,
    summarize_pod,
)

OWNER = Owner("smol", "ml", "uid-1")
T0, T1 = "2026-01-01T00:00:00Z", "2026-01-01T00:01:00Z"


def _spec(**kw: Any) -> LLMDeploymentSpec:
    return LLMDeploymentSpec.model_validate({"model": {"source": "builtin:smollm2-135m-instruct"}, **kw})


def _conditions(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in status["conditions"]}


def _deployment(replicas: int, ready: int, updated: int | None = None, **extra: Any) -> DeploymentState:
    return DeploymentState(
        generation=2,
        observed_generation=2,
        replicas=replicas,
        ready_replicas=ready,
        updated_replicas=replicas if updated is None else updated,
        available_replicas=ready,
        **extra,
    )


def _metrics(queue: float) -> MetricsSnapshot:
    return MetricsSnapshot(
        time=T0,
        queue_depth=queue,
        running_requests=0.0,
        kv_cache_utilization=0.1,
        kv_cache_percent=10,
        pods_scraped=1,
        pods_failed=0,
    )


def _pod(name: str, ready: bool, unschedulable: str | None = None) -> PodSummary:
    return PodSummary(name=name, ip="127.16.1.2", ready=ready, terminating=False, unschedulable_message=unschedulable)


def test_all_ready() -> None:
    status = build_status(
        owner=OWNER,
        generation=3,
        spec=_spec(replicas=2),
        deployment=_deployment(2, 2),
        pods=[_pod("a", True), _pod("b", True)],
        previous={},
        now=T0,
        applied=True,
    )
    conds = _conditions(status)
    assert conds["Ready"]["status"] == "True" and conds["Ready"]["reason"] == "AllReplicasReady"
    assert conds["Progressing"]["status"] == "False"
    assert conds["Degraded"]["status"] == "False"
    assert conds["ScalingActive"]["reason"] == "AutoscalingDisabled"
    assert conds["ScalingLimited"]["status"] == "False"
    assert all(c["observedGeneration"] == 3 and c["lastTransitionTime"] == T0 for c in conds.values())
    assert status["observedGeneration"] == 3
    assert (status["replicas"], status["readyReplicas"], status["desiredReplicas"]) == (2, 2, 2)
    assert status["ready"] == "2/2"
    assert status["selector"] == "app.kubernetes.io/name=kubellm,app.kubernetes.io/instance=smol"
    assert status["endpoint"] == "http://smol.ml.svc:8000"


def test_pending_for_gpus_is_reported() -> None:
    message = "0/4 nodes are available: 2 Insufficient nvidia.com/gpu, 2 node(s) didn't match selector."
    status = build_status(
        owner=OWNER,
        generation=1,
        spec=_spec(replicas=2),
        deployment=_deployment(2, 0, updated=2),
        pods=[_pod("a", False, message), _pod("b", False, message)],
        previous={},
        now=T0,
    )
    conds = _conditions(status)
    assert conds["Ready"]["status"] == "False" and "Insufficient nvidia.com/gpu" in conds["Ready"]["message"]
    assert conds["ScalingLimited"]["status"] == "True" and conds["ScalingLimited"]["reason"] == "InsufficientGPU"
    assert conds["Degraded"]["status"] == "True" and conds["Degraded"]["reason"] == "Unschedulable"
    assert status["pendingReplicas"] == 2


def test_transition_time_moves_only_on_flips() -> None:
    args: dict[str, Any] = {"owner": OWNER, "generation": 1, "spec": _spec()}
    first = build_status(**args, deployment=_deployment(1, 0), pods=[_pod("a", False)], previous={}, now=T0)
    same = build_status(**args, deployment=_deployment(1, 0), pods=[_pod("a", False)], previous=first, now=T1)
    assert status_patch(first, same) == {}, "an unchanged world writes nothing"
    flipped = build_status(**args, deployment=_deployment(1, 1), pods=[_pod("a", True)], previous=first, now=T1)
    conds = _conditions(flipped)
    assert conds["Ready"]["lastTransitionTime"] == T1
    assert conds["Degraded"]["lastTransitionTime"] == T0
    patch = status_patch(first, flipped)
    assert set(patch) >= {"conditions", "readyReplicas", "ready"} and "selector" not in patch


def test_rollout_progress_deadline_and_crashloop() -> None:
    rolling = build_status(
        owner=OWNER,
        generation=1,
        spec=_spec(replicas=2),
        deployment=_deployment(3, 2, updated=1),
        pods=[_pod("a", True), _pod("b", True), _pod("c", False)],
        previous={},
        now=T0,
    )
    assert _conditions(rolling)["Progressing"]["reason"] == "RollingOut"
    stuck = build_status(
        owner=OWNER,
        generation=1,
        spec=_spec(),
        deployment=_deployment(
            1, 0, conditions={"Progressing": {"status": "False", "reason": "ProgressDeadlineExceeded", "message": "x"}}
        ),
        pods=[PodSummary("a", None, False, False, broken_reason="CrashLoopBackOff")],
        previous={},
        now=T0,
    )
    assert _conditions(stuck)["Degraded"]["reason"] == "ProgressDeadlineExceeded"
    crash = build_status(
        owner=OWNER,
        generation=1,
        spec=_spec(),
        deployment=_deployment(1, 0),
        pods=[PodSummary("a", None, False, False, broken_reason="CrashLoopBackOff")],
        previous={},
        now=T0,
    )
    assert _conditions(crash)["Degraded"]["reason"] == "CrashLoopBackOff"


def test_scaling_report_decisions_are_capped_at_ten() -> None:
    spec = _spec(autoscaling={"enabled": True})
    status: dict[str, Any] = {}
    for i in range(12):
        report = ScalingReport(
            active=True,
            reason="MetricsAvailable",
            message="ok",
            metrics=_metrics(float(i)),
            decision=ScalingDecisionRecord(time=T0, from_replicas=i, to_replicas=i + 1, reason=f"r{i}"),
            scale_time=T1,
        )
        status = build_status(
            owner=OWNER, generation=1, spec=spec, deployment=None, pods=[], previous=status, now=T0, scaling=report
        )
    assert [d["reason"] for d in status["scalingDecisions"]] == [f"r{i}" for i in range(2, 12)]
    assert status["lastScaleTime"] == T1 and status["metrics"]["queueDepth"] == 11.0
    assert _conditions(status)["ScalingActive"]["status"] == "True"
    # A later status refresh without a new evaluation keeps the loop's verdict.
    again = build_status(owner=OWNER, generation=1, spec=spec, deployment=None, pods=[], previous=status, now=T1)
    assert _conditions(again)["ScalingActive"]["reason"] == "MetricsAvailable"
    external = build_status(
        owner=OWNER,
        generation=1,
        spec=_spec(autoscaling={"enabled": True, "mode": "external"}),
        deployment=None,
        pods=[],
        previous=status,
        now=T1,
    )
    assert _conditions(external)["ScalingActive"]["reason"] == "ExternalAutoscaler"


def test_invalid_spec_only_touches_degraded() -> None:
    good = build_status(
        owner=OWNER, generation=1, spec=_spec(), deployment=None, pods=[], previous={}, now=T0, applied=True
    )
    bad = invalid_spec_status(good, 2, "spec.model.source: bad", T1)
    assert _conditions(bad)["Degraded"]["reason"] == "InvalidSpec"
    assert _conditions(bad)["Ready"] == _conditions(good)["Ready"]
    assert bad["observedGeneration"] == 1, "generation 2 was not applied"
    # A status refresh (pods, Deployment) keeps the verdict; only a reconcile that applies clears it.
    refreshed = build_status(
        owner=OWNER,
        generation=2,
        spec=_spec(),
        deployment=_deployment(1, 1),
        pods=[_pod("a", True)],
        previous=bad,
        now=T1,
    )
    assert _conditions(refreshed)["Degraded"]["reason"] == "InvalidSpec"
    assert refreshed["observedGeneration"] == 1


def test_apply_failure_stands_until_an_apply_succeeds() -> None:
    args: dict[str, Any] = {"owner": OWNER, "spec": _spec(), "deployment": _deployment(1, 1), "pods": [_pod("a", True)]}
    applied = build_status(**args, generation=1, previous={}, now=T0, applied=True)
    message = 'applying Deployment smol failed: spec.template.spec.tolerations[0].operator: Unsupported value: "Nope"'
    failed = build_status(**args, generation=2, previous=applied, now=T1, error=message)
    degraded = _conditions(failed)["Degraded"]
    assert (degraded["status"], degraded["reason"], degraded["message"]) == ("True", "ApplyFailed", message)
    assert degraded["lastTransitionTime"] == T1
    assert failed["observedGeneration"] == 1
    # Seconds later the pods are all fine and a refresh runs: the failure still shows, unchanged (no write).
    later = build_status(**args, generation=2, previous=failed, now="2026-01-01T00:02:00Z")
    assert _conditions(later)["Degraded"] == degraded and later["observedGeneration"] == 1
    assert status_patch(failed, later) == {}
    fixed = build_status(**args, generation=3, previous=later, now="2026-01-01T00:03:00Z", applied=True)
    assert _conditions(fixed)["Degraded"]["reason"] == "AsExpected" and fixed["observedGeneration"] == 3
    # A writer that still sees generation 2 (its watch is behind) stamps nothing older than what is there.
    behind = build_status(**args, generation=2, previous=fixed, now="2026-01-01T00:04:00Z")
    assert all(cond["observedGeneration"] == 3 for cond in behind["conditions"])
    assert status_patch(fixed, behind) == {}


def test_metrics_in_status_are_rate_limited() -> None:
    first = _metrics(0.0)
    same_numbers_later = first.model_copy(update={"time": "2026-01-01T01:00:00Z"})
    assert metrics_due(None, first, 30)
    assert not metrics_due(first, same_numbers_later, 30), "a quiet fleet writes nothing"
    moved_soon = _metrics(5.0).model_copy(update={"time": "2026-01-01T00:00:10Z"})
    moved_later = _metrics(5.0).model_copy(update={"time": "2026-01-01T00:00:30Z"})
    assert not metrics_due(first, moved_soon, 30)
    assert metrics_due(first, moved_later, 30)
    assert metrics_due(first, moved_soon, 0)


def test_summarize_pod() -> None:
    pod = {
        "metadata": {"name": "p"},
        "status": {
            "phase": "Pending",
            "conditions": [
                {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "Insufficient gpu"}
            ],
        },
    }
    assert summarize_pod(pod) == PodSummary("p", None, False, False, "Insufficient gpu", None)
    running = {
        "metadata": {"name": "q", "deletionTimestamp": "2026-01-01T00:00:00Z"},
        "status": {"phase": "Running", "podIP": "127.16.1.9", "conditions": [{"type": "Ready", "status": "True"}]},
    }
    assert summarize_pod(running) == PodSummary("q", "127.16.1.9", True, True)


def test_settings_from_env_and_fail_fast() -> None:
    s = Settings.from_env(
        {"KUBELLM_NAMESPACES": "a, b", "KUBELLM_SCRAPE_CONCURRENCY": "8", "KUBELLM_TIMER_INTERVAL_SECONDS": "0.5"}
    )
    assert s.namespaces == ("a", "b") and s.scrape_concurrency == 8 and s.timer_interval_seconds == 0.5
    assert Settings.from_env({}) == Settings()
    bad = {
        "KUBELLM_SCRAPE_CONCURRENCY": "lots",
        "KUBELLM_SCRAPE_TIMEOUT_SECONDS": "0",
        "KUBELLM_NAMESPACES": "Not_A_Namespace",
        "KUBELLM_LOG_LEVEL": "LOUD",
        "KUBELLM_HANDLER_RETRIES": "-1",
        "KUBELLM_PEERING_LIFETIME_SECONDS": "0",
    }
    for var, value in bad.items():
        with pytest.raises(SettingsError, match=var):
            Settings.from_env({var: value})
    with pytest.raises(SettingsError, match="KUBELLM_PRESTOP_SLEEP_SECONDS"):
        Settings.from_env({"KUBELLM_DRAIN_SECONDS": "5", "KUBELLM_PRESTOP_SLEEP_SECONDS": "10"})

"""One autoscaling evaluation of one LLMDeployment: scrape its Ready pods, decide, write /scale, report.

The decision itself is autoscaler.decide (pure); this module is the thin part around it that touches the network.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from kubernetes.client.exceptions import ApiException

from kubellm.operator.apply import Kube
from kubellm.operator.autoscaler import Decision, Observation, Policy, decide
from kubellm.operator.history import expand, record, seed
from kubellm.operator.metrics import Scraper, ScrapeResult, ScrapeTarget, metrics_url
from kubellm.operator.resources import Owner
from kubellm.operator.spec import LLMDeploymentSpec, MetricsSnapshot, RecommendationSegment, ScalingDecisionRecord
from kubellm.operator.status import PodSummary, ScalingReport


@dataclass
class AutoscaleMemory:
    """Per-LLMDeployment loop state. The recommendation history is also in status (history.py), so that a
    restarted operator continues its windows; the rest starts over."""

    segments: list[RecommendationSegment] | None = None  # None: not loaded from status yet
    last_evaluation: float = -float("inf")
    failures_logged: set[str] = field(default_factory=set)  # pods whose failing scrape was already reported


def snapshot(result: ScrapeResult, now: str) -> MetricsSnapshot | None:
    if not result.samples:
        return None
    kv = sum(s.kv_cache_usage for s in result.samples) / len(result.samples)
    return MetricsSnapshot(
        time=now,
        queue_depth=sum(s.num_requests_waiting for s in result.samples),
        running_requests=sum(s.num_requests_running for s in result.samples),
        kv_cache_utilization=round(kv, 4),
        kv_cache_percent=round(100 * kv),
        pods_scraped=len(result.samples),
        pods_failed=len(result.failures),
    )


# (type, reason, message) -> an Event on the LLMDeployment.
PostEvent = Callable[[str, str, str], Awaitable[None]]


async def autoscale(
    *,
    post_event: PostEvent,
    owner: Owner,
    spec: LLMDeploymentSpec,
    pods: list[PodSummary],
    memory: AutoscaleMemory,
    stored: list[RecommendationSegment],
    resource_version: str,
    kube: Kube,
    scraper: Scraper,
    logger: logging.Logger,
    now: str,
    held: float = 0.0,
) -> tuple[ScalingReport, LLMDeploymentSpec]:
    """Scrape, decide, and (builtin mode) scale. Returns the report and the spec as it is after scaling.

    stored: the history as status has it (used when memory has none: after a restart or a failover).
    resource_version: the LLMDeployment's as observed; the scale write is conditional on it (scale_if).
    held: the requests the gateways hold for it (gateway_load.py), queued load no runtime reports."""
    auto = spec.autoscaling
    live = [p for p in pods if not p.terminating]
    ready = [p for p in live if p.ready and p.ip]
    result = await scraper.scrape([ScrapeTarget(p.name, metrics_url(p.ip or "")) for p in ready])
    # Warn once per pod when it starts failing (an Event then, not an Event storm per evaluation).
    failing = dict(result.failures)
    for pod in sorted(set(failing) - memory.failures_logged):
        logger.warning("%s/%s: scraping %s failed: %s", owner.namespace, owner.name, pod, failing[pod])
        await post_event("Warning", "ScrapeFailed", f"scraping {pod} failed: {failing[pod]}")
    memory.failures_logged = set(failing)
    metrics = snapshot(result, now)
    active = bool(result.samples)
    reason = "MetricsAvailable" if active else "MetricsUnavailable"
    if auto.mode == "external":
        message = "metrics reported; spec.replicas is left to an external autoscaler"
        return ScalingReport(active=True, reason="ExternalAutoscaler", message=message, metrics=metrics), spec

    clock = time.time()  # wall clock: the history outlives this process, in status
    if memory.segments is None:
        memory.segments = list(stored)
    if spec.replicas == 0:
        memory.segments = []  # at zero nothing is recommended; a wake starts a fresh window
    elif not memory.segments:
        memory.segments = seed(clock, spec.replicas)
    policy = Policy.from_spec(auto)
    observation = Observation(
        time=clock,
        current_replicas=spec.replicas,
        samples=result.samples,
        failed_scrapes=len(result.failures),
        not_ready=sum(1 for p in live if not p.ready and not p.unschedulable_message),
        pending_unschedulable=sum(1 for p in live if p.unschedulable_message),
        held=held,
    )
    decision = decide(observation, policy, expand(memory.segments, clock))
    recommended = decision.history[-1].replicas if decision.ratio is not None and decision.history else None
    if spec.replicas > 0:
        memory.segments = record(memory.segments, recommended, clock, policy.window)
    message = decision.reason if active or held > 0 else f"no metrics from {len(ready)} Ready pod(s): holding"
    entry = None
    if decision.changed:
        failure = await _scale(kube, owner, decision, resource_version, post_event, logger)
        if failure is not None:
            return ScalingReport(active, reason, failure, metrics=metrics, history=memory.segments), spec
        entry = ScalingDecisionRecord(
            time=now,
            from_replicas=decision.current_replicas,
            to_replicas=decision.desired_replicas,
            reason=decision.reason[:1024],
        )
        spec = spec.model_copy(update={"replicas": decision.desired_replicas})
    report = ScalingReport(
        active=active,
        reason=reason,
        message=message[:4096],
        limited=decision.limited,
        metrics=metrics,
        decision=entry,
        scale_time=now if entry else None,
        history=memory.segments,
    )
    return report, spec


async def _scale(
    kube: Kube,
    owner: Owner,
    decision: Decision,
    resource_version: str,
    post_event: PostEvent,
    logger: logging.Logger,
) -> str | None:
    """Write the decision through the scale subresource, conditional on the observed version; None when done,
    else why not (the report's message)."""
    args = (owner.namespace, owner.name, decision.current_replicas, decision.desired_replicas, resource_version)
    try:
        scaled = await asyncio.to_thread(kube.scale_if, *args)
    except ApiException as exc:
        logger.warning("scaling to %d failed: HTTP %s", decision.desired_replicas, exc.status)
        return f"scaling failed: HTTP {exc.status}"
    if not scaled:
        # Someone else (kubectl scale, GitOps) changed spec.replicas since the observation: theirs stands, and the
        # next evaluation decides from it.
        return f"not scaled to {decision.desired_replicas}: spec.replicas changed meanwhile"
    verb = "ScaledUp" if decision.desired_replicas > decision.current_replicas else "ScaledDown"
    await post_event("Normal", verb, decision.reason[:1024])
    logger.info("%s/%s: %s", owner.namespace, owner.name, decision.reason)
    return None

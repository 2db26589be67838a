"""PURE: the autoscaling decision. (observation, policy, history) -> decision, with its reason in words.

    load        = max(waiting / targetQueueDepth, kv_usage / targetKVCacheUtilization)   summed over replicas
                  (waiting: the runtimes' queues plus the requests the gateways hold for want of a Ready replica)
    recommended = current                     if |load / current - 1| <= tolerance
                  ceil(load)                  otherwise          (= ceil(current * ratio), ratio = load / current)
    stabilized  = scale up only to the LOWEST recommendation of the scale-up window,
                  scale down only to the HIGHEST recommendation of the scale-down window
    desired     = stabilized, moved at most maxScaleUpStep / maxScaleDownStep, clamped to [min, max]
    to zero     = only with minReplicas 0, once the recommendation has been 0 for scaleToZeroAfterSeconds

Replicas that are not Ready, or whose scrape failed, count as idle for scaling up (they will absorb load soon)
and block scaling down (no data is never a reason to remove capacity). With no metrics at all it holds, unless the
gateways hold requests for it: that queue alone then sizes a scale-up. Pods Pending for lack of GPUs block
scaling up: more replicas would only queue behind the same missing GPUs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from kubellm.operator.spec import AutoscalingSpec


@dataclass(frozen=True)
class PodMetrics:
    """One Ready pod's scrape (vLLM metric names, summed over its model_name labels)."""

    pod: str
    num_requests_waiting: float
    num_requests_running: float
    kv_cache_usage: float  # 0..1


@dataclass(frozen=True)
class Observation:
    time: float  # seconds; any clock, as long as the history uses the same one
    current_replicas: int  # spec.replicas
    samples: Sequence[PodMetrics]  # successful scrapes of Ready pods
    failed_scrapes: int = 0  # Ready pods whose scrape failed or timed out
    not_ready: int = 0  # pods that exist but are not Ready (starting, or Pending)
    pending_unschedulable: int = 0  # pods Pending because no node has the resources (GPUs)
    held: float = 0.0  # requests the gateways hold for it (no Ready replica to take them): queued load too

    @property
    def total_waiting(self) -> float:
        return sum(s.num_requests_waiting for s in self.samples)

    @property
    def total_running(self) -> float:
        return sum(s.num_requests_running for s in self.samples)

    @property
    def mean_kv_cache_usage(self) -> float:
        return sum(s.kv_cache_usage for s in self.samples) / len(self.samples) if self.samples else 0.0


@dataclass(frozen=True)
class Policy:
    min_replicas: int
    max_replicas: int
    target_queue_depth: float
    target_kv_cache_utilization: float
    tolerance: float = 0.1
    scale_up_stabilization_seconds: float = 0.0
    scale_down_stabilization_seconds: float = 300.0
    max_scale_up_step: int = 4
    max_scale_down_step: int = 1
    # With min_replicas 0: how long the recommendation must have been 0 (no load) before scaling to zero.
    scale_to_zero_after_seconds: float | None = None

    @property
    def window(self) -> float:
        """How far back the history must reach for every rule that reads it."""
        return max(
            self.scale_up_stabilization_seconds,
            self.scale_down_stabilization_seconds,
            2 * (self.scale_to_zero_after_seconds or 0.0),
        )

    @classmethod
    def from_spec(cls, spec: AutoscalingSpec) -> Policy:
        return cls(
            min_replicas=spec.min_replicas,
            max_replicas=spec.max_replicas,
            target_queue_depth=spec.target_queue_depth,
            target_kv_cache_utilization=spec.target_kv_cache_utilization,
            tolerance=spec.tolerance,
            scale_up_stabilization_seconds=spec.scale_up_stabilization_seconds,
            scale_down_stabilization_seconds=spec.scale_down_stabilization_seconds,
            max_scale_up_step=spec.max_scale_up_step,
            max_scale_down_step=spec.max_scale_down_step,
            scale_to_zero_after_seconds=spec.scale_to_zero_after_seconds,
        )


@dataclass(frozen=True)
class Recommendation:
    time: float
    replicas: int


@dataclass(frozen=True)
class Decision:
    current_replicas: int
    desired_replicas: int
    reason: str
    # Why the decision is held below what the load asks for (maxReplicas, Pending pods), or None.
    limited: str | None
    # The recommendations to remember for the next evaluation (stabilization windows).
    history: tuple[Recommendation, ...]
    ratio: float | None  # load per replica relative to target; None without metrics

    @property
    def changed(self) -> bool:
        return self.desired_replicas != self.current_replicas


def seed_history(now: float, current_replicas: int) -> tuple[Recommendation, ...]:
    """History for a loop that has none (new object, or operator restart): as if `current` had just been
    recommended, so that nothing is scaled down before a full scale-down window of fresh evidence."""
    return (Recommendation(now, current_replicas),)


def idle_seconds(history: Sequence[Recommendation], now: float) -> float:
    """How long the recommendation has been 0 without a break (0.0 if the latest one is not 0)."""
    since = now
    for rec in reversed(history):
        if rec.replicas != 0:
            break
        since = rec.time
    return now - since if history and history[-1].replicas == 0 else 0.0


def _gate_zero(history: Sequence[Recommendation], now: float, policy: Policy, steps: list[str]) -> int:
    """0 replicas only once the recommendation has been 0 for scaleToZeroAfterSeconds; else hold 1."""
    idle = idle_seconds(history, now)
    after = policy.scale_to_zero_after_seconds
    if after is not None and idle >= after:
        return 0
    wait = "never (no scaleToZeroAfterSeconds)" if after is None else f"after {after:g} s idle"
    steps.append(f"idle {idle:.0f} s, scale to zero {wait}: hold 1")
    return 1


def decide(obs: Observation, policy: Policy, history: Sequence[Recommendation]) -> Decision:
    now, current = obs.time, obs.current_replicas
    kept = [r for r in history if now - r.time < policy.window]
    steps: list[str] = []
    limited: str | None = None

    if not obs.samples and obs.held <= 0:
        # No metrics at all: hold, except to bring replicas back inside [min, max].
        desired = min(max(current, policy.min_replicas), policy.max_replicas)
        why = f"no metrics from any Ready pod ({obs.failed_scrapes} scrape(s) failed): holding"
        if desired != current:
            why = f"no metrics; {current} is outside [{policy.min_replicas}, {policy.max_replicas}]"
        return Decision(current, desired, why, None, tuple(kept), None)

    # Replicas without a sample count as idle (denominator), never as busy.
    counted = max(current, len(obs.samples), 1)
    waiting = obs.total_waiting + obs.held
    queue_load = waiting / policy.target_queue_depth
    kv_load = sum(s.kv_cache_usage for s in obs.samples) / policy.target_kv_cache_utilization
    load = max(queue_load, kv_load)
    ratio = load / counted
    held = f" ({obs.held:g} held at the gateway)" if obs.held else ""
    steps.append(
        f"queue {waiting / counted:.2f}/replica{held} (target {policy.target_queue_depth:g}), "
        f"KV {100 * sum(s.kv_cache_usage for s in obs.samples) / counted:.0f}%/replica "
        f"(target {100 * policy.target_kv_cache_utilization:.0f}%): ratio {ratio:.2f}"
    )
    if abs(ratio - 1.0) <= policy.tolerance:
        recommended = current
        steps.append(f"within tolerance {policy.tolerance:g}: recommend {current}")
    else:
        # The small epsilon keeps float noise (e.g. 3.0000000004) from adding a replica.
        recommended = max(0, math.ceil(load - 1e-9))
        steps.append(f"recommend {recommended}")
    recommended = min(max(recommended, policy.min_replicas), policy.max_replicas)
    new_history = (*kept, Recommendation(now, recommended))

    # Stabilization (as the HorizontalPodAutoscaler does it).
    up_window = [r.replicas for r in kept if now - r.time < policy.scale_up_stabilization_seconds]
    down_window = [r.replicas for r in kept if now - r.time < policy.scale_down_stabilization_seconds]
    up_bound = min([recommended, *up_window])
    down_bound = max([recommended, *down_window])
    if current < up_bound:
        desired = up_bound
    elif current > down_bound:
        desired = down_bound
    else:
        desired = current
    if desired != recommended:
        steps.append(f"stabilized to {desired}")

    if desired > current + policy.max_scale_up_step:
        desired = current + policy.max_scale_up_step
        steps.append(f"step limit +{policy.max_scale_up_step}: {desired}")
    if desired < current - policy.max_scale_down_step:
        desired = current - policy.max_scale_down_step
        steps.append(f"step limit -{policy.max_scale_down_step}: {desired}")

    if desired < current:
        missing = obs.failed_scrapes + obs.not_ready
        if missing:
            desired = current
            steps.append(f"scale-down blocked: {missing} replica(s) without metrics")
    if desired > current and obs.pending_unschedulable:
        limited = f"{obs.pending_unschedulable} pod(s) Pending, unschedulable (not enough GPUs)"
        desired = current
        steps.append(f"scale-up blocked: {limited}")

    clamped = min(max(desired, policy.min_replicas), policy.max_replicas)
    if clamped != desired:
        steps.append(f"clamped to [{policy.min_replicas}, {policy.max_replicas}]: {clamped}")
        desired = clamped
    if desired == 0 and current > 0:
        desired = _gate_zero(new_history, now, policy, steps)
    if limited is None and math.ceil(load - 1e-9) > policy.max_replicas and desired == policy.max_replicas:
        limited = f"load asks for {math.ceil(load - 1e-9)} replicas, maxReplicas is {policy.max_replicas}"

    if desired == current:
        head = f"hold at {current}"
    else:
        head = f"{'scale up' if desired > current else 'scale down'} {current} -> {desired}"
    reason = f"{head}: " + "; ".join(steps)
    return Decision(current, desired, reason, limited, new_history, ratio)


def simulate(
    trace: Sequence[tuple[float, float, float]],
    policy: Policy,
    *,
    initial_replicas: int,
) -> list[Decision]:
    """Run the loop over a trace of (time, total waiting requests, total KV demand in replicas' worth), where the
    load spreads evenly over the current replicas and new replicas are Ready at the next evaluation.
    Used by tests and the benchmark to check the loop's behaviour on step, spike, ramp and sine inputs."""
    decisions: list[Decision] = []
    current = initial_replicas
    history = seed_history(trace[0][0], current) if trace else ()
    for t, waiting, kv_demand in trace:
        per_pod_kv = min(1.0, kv_demand / current) if current else 0.0
        samples = [PodMetrics(f"pod-{i}", waiting / current, 0.0, per_pod_kv) for i in range(current)]
        decision = decide(Observation(t, current, samples), policy, history)
        history = decision.history
        current = decision.desired_replicas
        decisions.append(decision)
    return decisions


def wake_replicas(auto: AutoscalingSpec, held: int) -> int:
    """PURE: the replicas a model at zero wakes to. 1, unless the builtin autoscaler runs and the gateway held a
    queue when it woke the model: then as many as that queue asks for at targetQueueDepth (within minReplicas ..
    maxReplicas), so a burst at zero does not wait for a replica to load before a second one is asked for."""
    if not auto.enabled or auto.mode != "builtin" or held <= 0:
        return max(1, auto.min_replicas if auto.enabled else 1)
    return max(1, auto.min_replicas, min(auto.max_replicas, math.ceil(held / auto.target_queue_depth)))

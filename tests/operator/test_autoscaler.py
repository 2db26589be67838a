"""The pure autoscaling decision, on metric traces: step, spike, slow ramp, sine, missing data, flapping input."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from kubellm.operator.autoscaler import (
    Decision,
    Observation,
    PodMetrics,
    Policy,
    Recommendation,
    decide,
    seed_history,
    simulate,
)

PERIOD = 15.0
POLICY = Policy(
    min_replicas=1,
    max_replicas=10,
    target_queue_depth=4.0,
    target_kv_cache_utilization=0.8,
    tolerance=0.1,
    scale_up_stabilization_seconds=0.0,
    scale_down_stabilization_seconds=60.0,
    max_scale_up_step=4,
    max_scale_down_step=1,
)


def _trace(waiting: list[float], kv: list[float] | None = None) -> list[tuple[float, float, float]]:
    kv = kv or [0.0] * len(waiting)
    return [(i * PERIOD, w, k) for i, (w, k) in enumerate(zip(waiting, kv, strict=True))]


def _replicas(decisions: list[Decision]) -> list[int]:
    return [d.desired_replicas for d in decisions]


def _pods(n: int, waiting: float = 0.0, kv: float = 0.0) -> list[PodMetrics]:
    return [PodMetrics(f"p{i}", waiting, 0.0, kv) for i in range(n)]


def test_step_up_then_down() -> None:
    # Idle, then 40 waiting requests (10 replicas' worth), then idle again.
    waiting = [0.0] * 5 + [40.0] * 10 + [0.0] * 20
    replicas = _replicas(simulate(_trace(waiting), POLICY, initial_replicas=1))
    assert replicas[:5] == [1] * 5
    # +4 per evaluation: 1 -> 5 -> 9 -> 10, never above max.
    assert replicas[5:8] == [5, 9, 10]
    assert max(replicas) == 10
    # After the load goes, nothing moves until the last high recommendation (t=210 s) is a full scale-down
    # window old (t=270 s, evaluation 18), then one replica per evaluation.
    assert replicas[15:18] == [10, 10, 10]
    assert replicas[18] == 9
    downs = replicas[18:]
    assert all(b - a in (0, -1) for a, b in itertools.pairwise(downs))
    assert replicas[-1] < 10


def test_kv_cache_pressure_alone_scales_up() -> None:
    # No queue, but KV usage 1.0 on one replica against a 0.8 target: 1.25 replicas' worth -> 2.
    decision = decide(Observation(0.0, 1, _pods(1, kv=1.0)), POLICY, seed_history(0.0, 1))
    assert decision.desired_replicas == 2
    assert "KV" in decision.reason and "scale up 1 -> 2" in decision.reason


def test_single_spike_is_ignored_with_a_scale_up_window() -> None:
    policy = Policy(**{**POLICY.__dict__, "scale_up_stabilization_seconds": 30.0})
    waiting = [0.0] * 4 + [40.0] + [0.0] * 6
    replicas = _replicas(simulate(_trace(waiting), policy, initial_replicas=1))
    assert replicas == [1] * len(waiting)
    # Without the window the same spike scales up, and comes down only after the scale-down window.
    eager = _replicas(simulate(_trace(waiting), POLICY, initial_replicas=1))
    assert eager[4] == 5 and eager[5] == 5


def test_slow_ramp_tracks_the_load_without_overshoot() -> None:
    waiting = [i * 0.5 for i in range(80)]  # 0 -> 39.5 waiting over 20 minutes
    replicas = _replicas(simulate(_trace(waiting), POLICY, initial_replicas=1))
    assert all(b >= a for a, b in itertools.pairwise(replicas)), "a rising load never scales down"
    for w, r in zip(waiting, replicas, strict=True):
        needed = max(1, math.ceil(w / POLICY.target_queue_depth))
        assert r <= min(10, needed + 1), f"overshoot: {r} replicas for {w} waiting"
        assert r >= needed - 1, f"lagging: {r} replicas for {w} waiting"
    # 39.5 waiting on 9 replicas is 1.097 x target: inside the 10 % tolerance band, so 9 holds.
    assert replicas[-1] == 9


def test_sine_load_does_not_oscillate() -> None:
    waiting = [20 + 16 * math.sin(2 * math.pi * i * PERIOD / 600) for i in range(160)]  # 10-minute period
    replicas = _replicas(simulate(_trace(waiting), POLICY, initial_replicas=5))
    directions = [b - a for a, b in itertools.pairwise(replicas) if b != a]
    reversals = sum(1 for a, b in itertools.pairwise(directions) if (a > 0) != (b > 0))
    periods = 160 * PERIOD / 600
    assert reversals <= 2 * periods + 1, f"{reversals} reversals in {periods:.0f} periods: {replicas}"
    assert min(replicas) >= 1 and max(replicas) <= 10


def test_flapping_input_never_flaps_replicas() -> None:
    waiting = [40.0 if i % 2 == 0 else 0.0 for i in range(40)]
    replicas = _replicas(simulate(_trace(waiting), POLICY, initial_replicas=1))
    # The scale-down window always holds a high recommendation: up to 10, then steady.
    assert all(b >= a for a, b in itertools.pairwise(replicas))
    assert replicas[-1] == 10


def test_missing_metrics_never_scale_down() -> None:
    old = (Recommendation(-1000.0, 1),)
    no_data = decide(Observation(0.0, 5, [], failed_scrapes=5), POLICY, old)
    assert no_data.desired_replicas == 5 and not no_data.changed
    assert "no metrics" in no_data.reason
    # Idle pods, but two scrapes failed: no scale-down on partial data...
    partial = decide(Observation(0.0, 5, _pods(3), failed_scrapes=2), POLICY, old)
    assert partial.desired_replicas == 5 and "scale-down blocked" in partial.reason
    # ...while scaling up on partial data is fine (the missing pods count as idle).
    busy = decide(Observation(0.0, 5, _pods(3, waiting=20.0), failed_scrapes=2), POLICY, old)
    assert busy.desired_replicas == 9
    # Pods still starting count as idle too, and block scale-down the same way.
    starting = decide(Observation(0.0, 5, _pods(3), not_ready=2), POLICY, old)
    assert starting.desired_replicas == 5
    # Without any metrics, replicas outside [min, max] are still brought back inside.
    assert decide(Observation(0.0, 12, []), POLICY, old).desired_replicas == 10


def test_pending_for_gpus_stops_adding_replicas() -> None:
    obs = Observation(0.0, 4, _pods(2, waiting=40.0), pending_unschedulable=2)
    decision = decide(obs, POLICY, seed_history(0.0, 4))
    assert decision.desired_replicas == 4
    assert decision.limited is not None and "Pending" in decision.limited
    # The loop run repeatedly under the same pressure never adds a replica.
    history = decision.history
    for t in range(1, 20):
        decision = decide(Observation(t * PERIOD, 4, _pods(2, 40.0), pending_unschedulable=2), POLICY, history)
        history = decision.history
        assert decision.desired_replicas == 4


def test_tolerance_band_and_max_limit() -> None:
    # 4.3 waiting per replica against 4: within 10 %.
    within = decide(Observation(0.0, 2, _pods(2, waiting=4.3)), POLICY, seed_history(0.0, 2))
    assert not within.changed and "tolerance" in within.reason
    capped = decide(Observation(0.0, 10, _pods(10, waiting=40.0)), POLICY, seed_history(0.0, 10))
    assert capped.desired_replicas == 10
    assert capped.limited is not None and "maxReplicas" in capped.limited


def test_restart_seed_waits_a_full_window_before_scaling_down() -> None:
    history = seed_history(0.0, 6)
    for t in (15.0, 30.0, 45.0):
        decision = decide(Observation(t, 6, _pods(6)), POLICY, history)
        history = decision.history
        assert decision.desired_replicas == 6
    assert decide(Observation(61.0, 6, _pods(6)), POLICY, history).desired_replicas == 5


def test_random_traces_respect_invariants() -> None:
    seed = random.SystemRandom().randrange(2**32)
    print(f"seed={seed}")
    rng = random.Random(seed)
    for _ in range(50):
        policy = Policy(
            min_replicas=(lo := rng.randint(1, 3)),
            max_replicas=rng.randint(lo, 12),
            target_queue_depth=rng.uniform(0.5, 8),
            target_kv_cache_utilization=rng.uniform(0.3, 1.0),
            tolerance=rng.uniform(0, 0.3),
            scale_up_stabilization_seconds=rng.choice([0.0, 30.0]),
            scale_down_stabilization_seconds=rng.choice([0.0, 60.0, 300.0]),
            max_scale_up_step=rng.randint(1, 5),
            max_scale_down_step=rng.randint(1, 3),
        )
        current = rng.randint(policy.min_replicas, policy.max_replicas)
        history = seed_history(0.0, current)
        for step in range(1, 40):
            n_ok = rng.randint(0, current)
            failed = rng.randint(0, current - n_ok)
            obs = Observation(
                step * PERIOD,
                current,
                _pods(n_ok, waiting=rng.choice([0.0, rng.uniform(0, 50)]), kv=rng.random()),
                failed_scrapes=failed,
                pending_unschedulable=rng.choice([0, 0, 0, 1]),
            )
            d = decide(obs, policy, history)
            history = d.history
            assert policy.min_replicas <= d.desired_replicas <= policy.max_replicas, (seed, d)
            assert d.desired_replicas - current <= policy.max_scale_up_step, (seed, d)
            assert current - d.desired_replicas <= policy.max_scale_down_step, (seed, d)
            if failed or not obs.samples:
                assert d.desired_replicas >= current, (seed, d)
            if obs.pending_unschedulable:
                assert d.desired_replicas <= current, (seed, d)
            current = d.desired_replicas


@pytest.mark.parametrize("current", [1, 3])
def test_reason_states_numbers(current: int) -> None:
    d = decide(Observation(0.0, current, _pods(current, waiting=8.0)), POLICY, seed_history(0.0, current))
    assert f"{current} -> {d.desired_replicas}" in d.reason
    assert "queue 8.00/replica (target 4)" in d.reason


def test_a_wake_asks_for_what_the_held_queue_needs() -> None:
    from kubellm.operator.autoscaler import wake_replicas
    from kubellm.operator.spec import AutoscalingSpec

    auto = AutoscalingSpec.model_validate(
        {"enabled": True, "minReplicas": 0, "maxReplicas": 3, "targetQueueDepth": 4, "scaleToZeroAfterSeconds": 60}
    )
    assert wake_replicas(auto, 0) == 1  # a wake without a count (kubectl annotate): 0 -> 1 as always
    assert wake_replicas(auto, 1) == 1
    assert wake_replicas(auto, 8) == 2
    assert wake_replicas(auto, 9) == 3
    assert wake_replicas(auto, 1000) == 3  # maxReplicas caps it
    external = auto.model_copy(update={"mode": "external"})
    assert wake_replicas(external, 1000) == 1  # another autoscaler owns the replicas: only the documented 0 -> 1
    assert wake_replicas(AutoscalingSpec(), 1000) == 1  # autoscaling off


def test_requests_held_at_the_gateway_scale_up_replicas_that_are_not_ready() -> None:
    """Two replicas starting (no metrics yet) and 20 requests held at the gateway: the held queue alone sizes the
    scale-up (20 / 4 = 5), within the step limit; nothing held and no metrics: hold."""
    starting = Observation(time=0.0, current_replicas=2, samples=(), not_ready=2, held=20)
    up = decide(starting, POLICY, [])
    assert (up.current_replicas, up.desired_replicas) == (2, 5), up.reason
    assert "20 held at the gateway" in up.reason and up.reason.startswith("scale up 2 -> 5")
    quiet = decide(Observation(time=0.0, current_replicas=2, samples=(), not_ready=2), POLICY, [])
    assert quiet.desired_replicas == 2 and "no metrics" in quiet.reason
    # never down on held load: 1 held for 3 starting replicas holds (scale-down is blocked without metrics)
    few = decide(Observation(time=0.0, current_replicas=3, samples=(), not_ready=3, held=1), POLICY, [])
    assert few.desired_replicas == 3, few.reason


def test_held_requests_add_to_the_runtimes_queue() -> None:
    # one Ready replica with 4 waiting (at target) and 8 more held while a second replica starts: 12 / 4 = 3
    obs = Observation(time=0.0, current_replicas=2, samples=_pods(1, waiting=4.0), not_ready=1, held=8)
    assert decide(obs, POLICY, []).desired_replicas == 3
    assert decide(Observation(0.0, 2, _pods(1, waiting=4.0), not_ready=1), POLICY, []).desired_replicas == 2

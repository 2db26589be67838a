"""history.py and the scale-to-zero rule of autoscaler.decide (pure)."""

from __future__ import annotations

import pydantic
import pytest

from kubellm.operator.autoscaler import Observation, PodMetrics, Policy, decide, idle_seconds
from kubellm.operator.history import expand, from_iso, record, seed, to_iso
from kubellm.operator.spec import AutoscalingSpec, RecommendationSegment

T0 = 1_800_000_000.0


def test_history_round_trip_and_steady_load_writes_nothing() -> None:
    segments = seed(T0, 2)
    for t in range(1, 50):
        again = record(segments, 2, T0 + t, window=300)
        assert again == segments, "the same recommendation changes nothing (no status write)"
    segments = record(segments, 3, T0 + 60, window=300)
    segments = record(segments, 1, T0 + 120, window=300)
    assert [(from_iso(s.since) - T0, s.replicas) for s in segments] == [(0, 2), (60, 3), (120, 1)]
    recs = expand(segments, T0 + 130)
    # Every segment shows at its start and its end, so window queries see all of them.
    assert [(round(r.time - T0, 2), r.replicas) for r in recs] == [
        (0, 2),
        (60.0, 2),
        (60, 3),
        (120.0, 3),
        (120, 1),
        (130, 1),
    ]
    # Segments that ended before the window go; the last one always stays.
    assert [s.replicas for s in record(segments, 1, T0 + 500, window=300)] == [1]
    assert record(segments, None, T0 + 130, window=300) == segments


def test_restart_continues_the_window() -> None:
    """The history read back from status after a restart still holds the high recommendation: the scale-down
    window is not started over, nor is it forgotten."""
    policy = Policy(
        min_replicas=1,
        max_replicas=4,
        target_queue_depth=1,
        target_kv_cache_utilization=1,
        scale_down_stabilization_seconds=100,
    )
    stored = [
        RecommendationSegment(since=to_iso(T0), replicas=3),
        RecommendationSegment(since=to_iso(T0 + 50), replicas=1),
    ]
    idle = [PodMetrics("p", 0, 0, 0.0)] * 3
    held = decide(Observation(T0 + 90, 3, idle), policy, expand(stored, T0 + 90))
    assert held.desired_replicas == 3, held.reason  # 3 was recommended 40 s ago: inside the window
    later = decide(Observation(T0 + 151, 3, idle), policy, expand(stored, T0 + 151))
    assert later.desired_replicas == 2, later.reason  # the window since the last 3 has passed


def _zero_policy(after: float | None = 30) -> Policy:
    return Policy(
        min_replicas=0,
        max_replicas=4,
        target_queue_depth=1,
        target_kv_cache_utilization=1,
        scale_down_stabilization_seconds=10,
        scale_to_zero_after_seconds=after,
    )


def test_scale_to_zero_only_after_the_idle_window() -> None:
    policy = _zero_policy()
    idle = [PodMetrics("p", 0, 0, 0.0)]
    history = seed(T0, 1)
    desired = []
    for t in range(0, 61, 5):
        now = T0 + t
        d = decide(Observation(now, 1, idle), policy, expand(history, now))
        history = record(history, d.history[-1].replicas, now, policy.window)
        desired.append((t, d.desired_replicas))
        if d.desired_replicas == 0:
            break
    # The recommendation is 0 from the first evaluation on (t=0): 30 s idle later, and not before, to zero.
    assert desired[-1] == (30, 0), desired
    assert all(r == 1 for _, r in desired[:-1])
    assert idle_seconds(expand(history, T0 + 30), T0 + 30) == 30


def test_at_zero_missing_data_never_scales_up() -> None:
    d = decide(Observation(T0, 0, []), _zero_policy(), ())
    assert d.desired_replicas == 0 and not d.changed, d.reason
    # Without scaleToZeroAfterSeconds the rule never lets replicas reach zero from load alone.
    held = decide(Observation(T0, 1, [PodMetrics("p", 0, 0, 0.0)]), _zero_policy(None), expand(seed(T0 - 999, 0), T0))
    assert held.desired_replicas == 1, held.reason


def test_min_replicas_zero_needs_the_idle_window() -> None:
    with pytest.raises(pydantic.ValidationError, match="scaleToZeroAfterSeconds"):
        AutoscalingSpec.model_validate({"minReplicas": 0})
    spec = AutoscalingSpec.model_validate({"minReplicas": 0, "scaleToZeroAfterSeconds": 300})
    assert Policy.from_spec(spec).scale_to_zero_after_seconds == 300

"""PURE: the autoscaler's recommendation history as status keeps it, so that a restarted or failed-over operator
continues its stabilization windows instead of starting them over.

The history is run-length encoded: one segment per change of the recommended replicas (`since`, `replicas`),
each lasting until the next one starts, the last one until now. A steady load therefore writes nothing: the
segments change only when the recommendation does, or when a whole segment leaves the longest window.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

from kubellm.operator.autoscaler import Recommendation
from kubellm.operator.spec import RecommendationSegment

MAX_SEGMENTS = 32
_EPSILON = 1e-3  # a segment's end: an instant before the next one starts


def to_iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def from_iso(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def seed(now: float, replicas: int) -> list[RecommendationSegment]:
    """No history (a new object): as if `replicas` had just been recommended, so nothing is scaled down before a
    full window of fresh evidence."""
    return [RecommendationSegment(since=to_iso(now), replicas=replicas)]


def expand(segments: Sequence[RecommendationSegment], now: float) -> tuple[Recommendation, ...]:
    """The recommendations the segments stand for: one at each segment's start and one at its end (the next
    start, or now), so that a window query sees every segment that overlaps its window."""
    out: list[Recommendation] = []
    starts = [min(from_iso(s.since), now) for s in segments]
    for i, seg in enumerate(segments):
        end = starts[i + 1] - _EPSILON if i + 1 < len(segments) else now
        out.append(Recommendation(starts[i], seg.replicas))
        if end > starts[i]:
            out.append(Recommendation(end, seg.replicas))
    return tuple(out)


def record(
    segments: Sequence[RecommendationSegment], recommended: int | None, now: float, window: float
) -> list[RecommendationSegment]:
    """After an evaluation: a new segment if the recommendation changed (None: no recommendation, no metrics),
    and the segments that ended before the window dropped (the last one always stays)."""
    out = list(segments)
    if recommended is not None and (not out or out[-1].replicas != recommended):
        out.append(RecommendationSegment(since=to_iso(now), replicas=recommended))
    while len(out) > 1 and from_iso(out[1].since) < now - window:
        out.pop(0)
    return out[-MAX_SEGMENTS:]

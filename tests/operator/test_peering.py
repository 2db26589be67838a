"""peering.py (pure): the fleet loop acts only on the peer kopf lets run (no other live peer with priority >= ours)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from kubellm.operator.peering import Leadership, leads

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def _peer(priority: int, seen_ago: float, lifetime: int = 60) -> dict[str, object]:
    return {"priority": priority, "lifetime": lifetime, "lastseen": (NOW - timedelta(seconds=seen_ago)).isoformat()}


def test_leads_unless_a_live_peer_outranks_or_ties() -> None:
    assert leads({"me": _peer(5, 0)}, "me", 5, NOW)
    assert leads({"me": _peer(5, 0), "other": _peer(4, 0)}, "me", 5, NOW)
    assert not leads({"me": _peer(5, 0), "other": _peer(6, 0)}, "me", 5, NOW)
    assert not leads({"other": _peer(5, 0)}, "me", 5, NOW), "a tie pauses both, as kopf does"
    assert leads({"other": _peer(9, 120)}, "me", 5, NOW), "a dead peer does not count"


def test_leadership_standalone_and_standby() -> None:
    assert Leadership("me", 1, peering=False).active(NOW)
    standby = Leadership("me", 1, peering=True)
    assert not standby.active(NOW), "no peering object seen yet"
    standby.observe(("ns", "kubellm"), {"me": _peer(1, 0)})
    assert standby.active(NOW)
    standby.observe(("ns2", "kubellm"), {"other": _peer(2, 0)})
    assert not standby.active(NOW), "outranked in one watched namespace pauses kopf everywhere"
    standby.observe(("ns2", "kubellm"), None)
    assert standby.active(NOW)

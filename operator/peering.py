"""Which kopf peer leads: only its fleet loop scrapes, scales and resyncs (kopf pauses the others' handlers).

kopf's rule (kopf/_core/engines/peering.py): an operator pauses while another live peer has a higher priority,
or the same one. The loop reads the same peering object kopf writes its keep-alives to and applies that rule.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any


def leads(peers: Mapping[str, Mapping[str, Any]], identity: str, priority: int, now: datetime) -> bool:
    """PURE: no other live peer has a priority >= ours. `peers`: the peering object's status, by identity."""
    for other, info in peers.items():
        if other == identity or not isinstance(info, Mapping):
            continue
        try:
            seen = datetime.fromisoformat(str(info.get("lastseen")))
        except ValueError:
            continue
        if seen.tzinfo is None:
            seen = seen.replace(tzinfo=UTC)
        alive = seen + timedelta(seconds=int(info.get("lifetime", 60))) > now
        if alive and int(info.get("priority", 0)) >= priority:
            return False
    return True


@dataclass
class Leadership:
    """Standalone: always the leader. Peering: what the peering objects last said (a kopf handler feeds them)."""

    identity: str
    priority: int
    peering: bool
    peers: dict[Any, Mapping[str, Mapping[str, Any]]] = field(default_factory=dict)  # per peering object

    def observe(self, key: Any, status: Mapping[str, Mapping[str, Any]] | None) -> None:
        if status is None:
            self.peers.pop(key, None)
        else:
            self.peers[key] = dict(status)

    def active(self, now: datetime | None = None) -> bool:
        if not self.peering:
            return True
        if not self.peers:
            return False  # not seen a peering object yet: stand by
        when = now or datetime.now(UTC)
        return all(leads(peers, self.identity, self.priority, when) for peers in self.peers.values())

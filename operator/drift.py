"""PURE: has anyone but the operator written an owned object since the operator last applied it?

Server-side apply records, per field manager, when it last wrote and which fields it owns (`managedFields`). A
write by another manager after our last apply (`kubectl scale deploy`, `kubectl edit`, a GitOps tool) may have
changed a field we own: re-applying (forced) takes such fields back and is a no-op otherwise, in which case the
write is remembered as harmless so that later events of the same object do not re-apply again.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kubellm.operator import constants as c


@dataclass(frozen=True)
class ForeignWrite:
    """One managedFields entry of another manager (its time has a one-second resolution)."""

    manager: str
    operation: str
    time: str
    subresource: str = ""


def _entries(obj: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return list((obj.get("metadata") or {}).get("managedFields") or [])


def foreign_writes(obj: Mapping[str, Any], field_manager: str = c.FIELD_MANAGER) -> list[ForeignWrite]:
    """Writes by other managers at or after our last apply (all of them when we own nothing), status excluded:
    a controller reporting status touches no field we own. Once a forced apply takes back every field of such a
    write, the API server drops its entry."""
    entries = _entries(obj)
    ours = [str(e.get("time") or "") for e in entries if e.get("manager") == field_manager]
    since = max(ours) if ours else ""
    # Writes through the scale subresource are recorded without a time: always count them.
    return [
        ForeignWrite(str(e.get("manager")), str(e.get("operation")), str(e.get("time") or ""), e.get("subresource", ""))
        for e in entries
        if e.get("manager") != field_manager
        and e.get("subresource") != "status"
        and (not e.get("time") or str(e["time"]) >= since)
    ]


def write_key(write: ForeignWrite, resource_version: str) -> tuple[ForeignWrite, str]:
    """How a write found harmless is remembered: by its time, or (time-less) by the object version it was seen in."""
    return write, "" if write.time else resource_version


def controller_owner(obj: Mapping[str, Any]) -> tuple[str, str] | None:
    """(name, uid) of the LLMDeployment controlling `obj`, if one does."""
    for ref in (obj.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("kind") == c.KIND and ref.get("apiVersion", "").startswith(f"{c.GROUP}/") and ref.get("controller"):
            return str(ref.get("name")), str(ref.get("uid"))
    return None

"""drift.py (pure): which managedFields entries count as another manager's write since our last apply."""

from __future__ import annotations

from typing import Any

from kubellm.operator import constants as c
from kubellm.operator.drift import ForeignWrite, controller_owner, foreign_writes


def _entry(manager: str, time: str, operation: str = "Update", subresource: str | None = None) -> dict[str, Any]:
    out = {"manager": manager, "operation": operation, "time": time, "fieldsV1": {}}
    if subresource:
        out["subresource"] = subresource
    return out


def test_foreign_writes_after_our_apply_count_status_never() -> None:
    obj = {
        "metadata": {
            "managedFields": [
                _entry(c.FIELD_MANAGER, "2026-01-01T00:00:10Z", "Apply"),
                _entry("kubectl-edit", "2026-01-01T00:00:05Z"),  # before our apply: already taken back
                _entry("kube-controller-manager", "2026-01-01T00:00:20Z", subresource="status"),
                _entry("kubectl", "2026-01-01T00:00:10Z", subresource="scale"),  # same second: counts
                _entry("argocd", "2026-01-01T00:00:30Z", "Apply"),
            ]
        }
    }
    assert foreign_writes(obj) == [
        ForeignWrite("kubectl", "Update", "2026-01-01T00:00:10Z", "scale"),
        ForeignWrite("argocd", "Apply", "2026-01-01T00:00:30Z"),
    ]
    assert foreign_writes({"metadata": {"managedFields": [_entry(c.FIELD_MANAGER, "2026-01-01T00:00:10Z")]}}) == []
    # `kubectl scale deploy` writes through /scale, recorded without a time: it always counts.
    timeless = {"manager": "kubectl", "operation": "Update", "subresource": "scale", "fieldsV1": {}}
    scaled = {"metadata": {"managedFields": [_entry(c.FIELD_MANAGER, "2026-01-01T00:00:10Z", "Apply"), timeless]}}
    assert foreign_writes(scaled) == [ForeignWrite("kubectl", "Update", "", "scale")]
    # Owning nothing: every write is someone else's.
    assert len(foreign_writes({"metadata": {"managedFields": [_entry("x", "2026-01-01T00:00:01Z")]}})) == 1


def test_controller_owner() -> None:
    ref = {"apiVersion": c.API_VERSION, "kind": c.KIND, "name": "a", "uid": "u", "controller": True}
    assert controller_owner({"metadata": {"ownerReferences": [ref]}}) == ("a", "u")
    assert controller_owner({"metadata": {"ownerReferences": [{**ref, "controller": False}]}}) is None
    assert controller_owner({"metadata": {"ownerReferences": [{**ref, "kind": "ReplicaSet"}]}}) is None
    assert controller_owner({"metadata": {}}) is None

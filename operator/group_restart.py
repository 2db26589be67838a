"""PURE: a multi-node replica group restarts as a whole when it loses a member.

The ranks of one replica are one torch.distributed job: a pod that is replaced (evicted, its node lost, deleted by
hand) cannot rejoin the job the others are still in. So, as LeaderWorkerSet's RecreateGroupOnPodRestart does, the
group is recreated: its rank-0 pod is deleted, and with it every worker that had joined that rank 0. Membership is
recorded on the pods themselves, so an operator restart or a failover loses nothing:

- a worker (rank > 0) is stamped with the uid of the live rank-0 pod when first seen (ANNOTATION_GROUP_LEADER);
- once every worker carries its uid, the rank-0 pod is marked complete (ANNOTATION_GROUP_COMPLETE);
- a complete rank 0 with fewer stamped workers than the group needs lost a member: delete rank 0;
- a worker stamped with the uid of a rank 0 that is gone (or going) belongs to a group that no longer exists:
  delete it (its StatefulSet recreates it, and it joins the new rank 0).

Every rule reads only the current pods (level-triggered): the fleet loop applies them on each tick.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from kubellm.operator.status import PodSummary


@dataclass(frozen=True)
class GroupAction:
    action: Literal["delete", "stamp", "complete"]
    pod: str
    uid: str  # the pod's uid: a delete is conditional on it (never a namesake created since)
    leader: str = ""  # stamp: the rank-0 pod's uid
    reason: str = ""
    restarts_group: bool = False  # a delete of a rank 0 that lost a worker (an Event says so)


def group_actions(pods: Sequence[PodSummary], nodes: int) -> list[GroupAction]:
    """What to do now, for all groups of one LLMDeployment (pods outside groups are left alone)."""
    groups: dict[str, list[PodSummary]] = {}
    for pod in pods:
        if pod.group is not None and pod.rank is not None and not pod.terminating:
            groups.setdefault(pod.group, []).append(pod)
    actions: list[GroupAction] = []
    for group in sorted(groups):
        actions += _one_group(groups[group], nodes)
    return actions


def _one_group(live: list[PodSummary], nodes: int) -> list[GroupAction]:
    leader = next((p for p in live if p.rank == 0), None)
    workers = [p for p in live if p.rank != 0]
    leader_uid = leader.uid if leader is not None else None
    actions = [
        GroupAction("delete", w.name, w.uid, reason=f"its rank 0 ({w.leader}) is gone")
        for w in workers
        if w.leader is not None and w.leader != leader_uid
    ]
    if leader is None:
        return actions
    members = [w for w in workers if w.leader == leader.uid]
    if leader.complete:
        if len(members) < nodes - 1:
            lost = nodes - 1 - len(members)
            reason = f"{lost} of its {nodes - 1} workers lost"
            actions.append(GroupAction("delete", leader.name, leader.uid, reason=reason, restarts_group=True))
        return actions
    actions += [GroupAction("stamp", w.name, w.uid, leader=leader.uid) for w in workers if w.leader is None]
    if len(members) >= nodes - 1:
        actions.append(GroupAction("complete", leader.name, leader.uid))
    return actions

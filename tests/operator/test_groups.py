"""Replicas spanning several nodes: the groups' StatefulSets and headless Services as rendered (no cluster), the
flags their pods run with as the runtime parses them, and the group-restart rules (group_restart.py)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from kubellm.operator import constants as c
from kubellm.operator.group_restart import GroupAction, group_actions
from kubellm.operator.groups import NODE_RANK_ENV, StatefulSetState, groups_state
from kubellm.operator.render import render
from kubellm.operator.resources import Owner, selector_string
from kubellm.operator.settings import Settings
from kubellm.operator.spec import LLMDeploymentSpec
from kubellm.operator.status import PodSummary, build_status
from kubellm.runtime import config
from kubellm.runtime.server import cli

OWNER = Owner(name="big", namespace="ml", uid="u-1")
GROUPED = {
    "model": {"source": "builtin:smollm2-135m-instruct"},
    "replicas": 2,
    "resources": {"gpus": 2},
    "parallelism": {"tensor": 2, "pipeline": 2, "nodes": 2},
}


def _render(spec: dict[str, Any] = GROUPED) -> Any:
    return render(OWNER, LLMDeploymentSpec.model_validate(spec), Settings())


def test_groups_render_as_statefulsets_with_headless_services_and_no_deployment() -> None:
    objs = _render()
    assert objs.deployment is None
    kinds = [(o["kind"], o["metadata"]["name"]) for o in objs.to_apply()]
    assert kinds == [
        ("ConfigMap", "big-engine"),
        ("Service", "big-g0"),
        ("StatefulSet", "big-g0"),
        ("Service", "big-g1"),
        ("StatefulSet", "big-g1"),
        ("Service", "big"),
        ("PodDisruptionBudget", "big"),
    ]
    headless = objs.groups[0]["spec"]
    assert headless["clusterIP"] == "None" and headless["publishNotReadyAddresses"] is True
    assert headless["selector"][c.LABEL_GROUP] == "0"
    sts = objs.groups[1]["spec"]
    assert (sts["replicas"], sts["serviceName"], sts["podManagementPolicy"]) == (2, "big-g0", "Parallel")
    template_labels = sts["template"]["metadata"]["labels"]
    assert template_labels.items() >= sts["selector"]["matchLabels"].items()
    assert template_labels[c.LABEL_GROUP] == "0"
    container = sts["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "2", "each pod holds its node's GPUs"
    assert any(v["name"] == "dshm" for v in sts["template"]["spec"]["volumes"])
    assert {"name": "dist", "containerPort": c.DIST_PORT, "protocol": "TCP"} in container["ports"]
    # Only each group's pod 0 serves: the Service selects it alone, and HPA counts replicas by status.selector.
    assert objs.service["spec"]["selector"][c.LABEL_POD_INDEX] == "0"
    assert selector_string("big", LLMDeploymentSpec.model_validate(GROUPED)).endswith(f",{c.LABEL_POD_INDEX}=0")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kubellm serve")
    cli.add_arguments(parser)
    return parser


def test_a_group_pod_runs_its_rank_as_the_runtime_parses_it(tmp_path: Path) -> None:
    """The rendered args, with the ConfigMap's file and $(KUBELLM_NODE_RANK) expanded as the kubelet does."""
    objs = _render()
    path = tmp_path / c.ENGINE_CONFIG_KEY
    path.write_text(objs.config_map["data"][c.ENGINE_CONFIG_KEY])
    sts = objs.groups[3]  # group 1's StatefulSet
    container = sts["spec"]["template"]["spec"]["containers"][0]
    (rank_env,) = [e for e in container["env"] if e["name"] == NODE_RANK_ENV]
    assert rank_env["valueFrom"]["fieldRef"]["fieldPath"] == f"metadata.labels['{c.LABEL_POD_INDEX}']"
    assert container["args"][:3] == ["serve", "--config", f"{c.CONFIG_MOUNT_PATH}/{c.ENGINE_CONFIG_KEY}"]
    args = [str(path), *(a.replace(f"$({NODE_RANK_ENV})", "1") for a in container["args"][3:])]
    resolved = config.engine_config(cli.apply_config_file(_parser().parse_args(["--config", *args])))
    assert (resolved.tensor_parallel_size, resolved.pipeline_parallel_size) == (2, 2)
    assert (resolved.nnodes, resolved.node_rank) == (2, 1)
    assert (resolved.master_addr, resolved.master_port) == ("big-g1-0.big-g1.ml.svc", c.DIST_PORT)
    assert list(resolved.node_ranks) == [2, 3]
    assert config.EngineConfig().master_port == c.DIST_PORT
    engine = json.loads(objs.config_map["data"][c.ENGINE_CONFIG_KEY])["engine"]
    assert "nnodes" not in engine, "the per-pod flags stay out of the shared file"


def test_single_node_replicas_stay_a_deployment() -> None:
    spec = {**GROUPED, "parallelism": {"tensor": 2, "pipeline": 1, "nodes": 1}}
    objs = _render(spec)
    assert objs.deployment is not None and objs.groups == []
    assert c.LABEL_POD_INDEX not in objs.service["spec"]["selector"]


def _pod(name: str, rank: int, uid: str, *, group: str = "0", leader: str | None = None, **kw: Any) -> PodSummary:
    return PodSummary(name=name, ip="10.0.0.1", ready=True, terminating=False, uid=uid, group=group, rank=rank,
                      leader=leader, **kw)  # fmt: skip


def test_workers_are_stamped_then_the_group_is_marked_complete() -> None:
    fresh = [_pod("g0-0", 0, "L"), _pod("g0-1", 1, "W1"), _pod("g0-2", 2, "W2")]
    assert group_actions(fresh, 3) == [
        GroupAction("stamp", "g0-1", "W1", leader="L"),
        GroupAction("stamp", "g0-2", "W2", leader="L"),
    ]
    stamped = [_pod("g0-0", 0, "L"), _pod("g0-1", 1, "W1", leader="L"), _pod("g0-2", 2, "W2", leader="L")]
    assert group_actions(stamped, 3) == [GroupAction("complete", "g0-0", "L")]
    whole = [_pod("g0-0", 0, "L", complete=True), *stamped[1:]]
    assert group_actions(whole, 3) == [], "a whole group is left alone"


def test_a_group_that_lost_a_worker_restarts_from_rank_0() -> None:
    replaced = [_pod("g0-0", 0, "L", complete=True), _pod("g0-1", 1, "W1b"), _pod("g0-2", 2, "W2", leader="L")]
    (action,) = group_actions(replaced, 3)
    assert (action.action, action.pod, action.uid, action.restarts_group) == ("delete", "g0-0", "L", True)
    # While rank 0 is going (or gone), the workers that had joined it go too; the fresh one waits for the new one.
    going = [PodSummary(name="g0-0", ip=None, ready=False, terminating=True, uid="L", group="0", rank=0,
                        complete=True), *replaced[1:]]  # fmt: skip
    assert group_actions(going, 3) == [GroupAction("delete", "g0-2", "W2", reason="its rank 0 (L) is gone")]
    # The new rank 0 takes the fresh workers in.
    anew = [_pod("g0-0", 0, "L2"), _pod("g0-1", 1, "W1b"), _pod("g0-2", 2, "W2b")]
    assert [a.action for a in group_actions(anew, 3)] == ["stamp", "stamp"]


def test_groups_are_independent_and_plain_pods_ignored() -> None:
    pods = [
        _pod("g0-0", 0, "L0", complete=True),
        _pod("g0-1", 1, "A", leader="L0"),
        _pod("g1-0", 0, "L1", group="1", complete=True),  # its worker is missing: lost
        PodSummary(name="plain", ip=None, ready=True, terminating=False, uid="P"),
    ]
    assert [(a.action, a.pod) for a in group_actions(pods, 2)] == [("delete", "g1-0")]


def test_status_counts_groups() -> None:
    spec = LLMDeploymentSpec.model_validate(GROUPED)
    pods = [
        _pod("big-g0-0", 0, "a"),
        _pod("big-g0-1", 1, "b"),
        PodSummary(name="big-g1-0", ip=None, ready=False, terminating=False, uid="c", group="1", rank=0),
        _pod("big-g1-1", 1, "d", group="1"),
    ]

    def sts(name: str, ready: int) -> StatefulSetState:
        status = {"observedGeneration": 1, "replicas": 2, "readyReplicas": ready, "updatedReplicas": 2,
                  "availableReplicas": ready}  # fmt: skip
        return StatefulSetState.from_object({"metadata": {"name": name, "generation": 1}, "status": status})

    sets = [sts("big-g0", 2), sts("big-g1", 1)]
    state = groups_state(sets, 2)
    assert (state.replicas, state.ready_replicas, state.updated_replicas, state.available_replicas) == (2, 1, 2, 1)
    status = build_status(
        owner=OWNER, generation=1, spec=spec, deployment=state, pods=pods, previous={}, now="2026-12-01T00:00:00Z"
    )
    assert (status["replicas"], status["readyReplicas"], status["ready"]) == (2, 1, "1/2")
    assert status["selector"].endswith(f"{c.LABEL_POD_INDEX}=0")
    ready = {cond["type"]: cond for cond in status["conditions"]}["Ready"]
    assert (ready["status"], ready["reason"]) == ("True", "PartiallyReady")

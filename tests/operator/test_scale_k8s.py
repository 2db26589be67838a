"""Scale writes with optimistic concurrency, and the autoscaler's history in status, against the real API server."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from cluster import wait_until
from kubernetes import client

from kubellm.operator import constants as c
from kubellm.operator.apply import Kube

pytestmark = pytest.mark.k8s

SOURCE = "builtin:smollm2-135m-instruct"


def _create(api: Any, namespace: str, name: str, spec: dict[str, Any]) -> None:
    body = {"apiVersion": c.API_VERSION, "kind": c.KIND, "metadata": {"name": name}, "spec": spec}
    client.CustomObjectsApi(api).create_namespaced_custom_object(c.GROUP, c.VERSION, namespace, c.PLURAL, body)


def _get(api: Any, namespace: str, name: str) -> dict[str, Any]:
    custom: Any = client.CustomObjectsApi(api)
    return dict(custom.get_namespaced_custom_object(c.GROUP, c.VERSION, namespace, c.PLURAL, name))


def test_a_concurrent_scale_is_not_lost(k8s_cluster: Any, private_namespace: str) -> None:
    """No operator here: Kube.scale_if (what the autoscaler writes with) against a concurrent `kubectl scale`."""
    api = k8s_cluster.api_client()
    ns = private_namespace
    _create(api, ns, "race", {"model": {"source": SOURCE}, "replicas": 1})
    observed = _get(api, ns, "race")["metadata"]["resourceVersion"]
    k8s_cluster.kubectl("scale", "llmd/race", "-n", ns, "--replicas=3")  # lands between observation and write
    kube = Kube(api)
    assert not kube.scale_if(ns, "race", 1, 2, observed), "a decision made on stale replicas must not land"
    assert _get(api, ns, "race")["spec"]["replicas"] == 3
    # A write that did not touch replicas (a status update) only bumps the version: the scale goes through.
    observed = _get(api, ns, "race")["metadata"]["resourceVersion"]
    kube.patch_status(ns, "race", {"ready": "0/3"})
    assert kube.scale_if(ns, "race", 3, 4, observed)
    assert _get(api, ns, "race")["spec"]["replicas"] == 4
    api.close()


def test_a_restarted_operator_continues_the_window(
    k8s_cluster: Any, private_namespace: str, tmp_path: Path, operator_process_factory: Any
) -> None:
    """The recommendation history lives in status: a new operator process reads it instead of starting over."""
    api = k8s_cluster.api_client()
    ns = private_namespace
    auto = {"enabled": True, "minReplicas": 1, "maxReplicas": 3, "evaluationPeriodSeconds": 1}
    _create(api, ns, "win", {"model": {"source": SOURCE}, "replicas": 2, "autoscaling": auto})
    op = operator_process_factory(ns, tmp_path / "operator.log").start()
    # No metrics (no runtime serves the pods' IPs): the loop holds at 2, seeded with a recommendation of 2.
    first = wait_until(
        lambda: (_get(api, ns, "win").get("status") or {}).get("recommendations"),
        timeout=60,
        what="the recommendation history in status",
    )
    assert [s["replicas"] for s in first] == [2]
    core: Any = client.CoreV1Api(api)

    def scrape_failures() -> int:
        events = core.list_namespaced_event(ns, field_selector="involvedObject.name=win")
        return sum(1 for e in events.items if e.reason == "ScrapeFailed")

    # An evaluation ran: each process reports a pod's failing scrape once, as an Event.
    before = wait_until(scrape_failures, timeout=30, what="an evaluation (a ScrapeFailed event)")
    op.kill()
    op.start()
    wait_until(lambda: scrape_failures() > before, timeout=30, what="an evaluation by the restarted operator")
    # The new process evaluated with the history from status: continued, not re-seeded at its start.
    assert _get(api, ns, "win")["status"]["recommendations"] == first
    api.close()

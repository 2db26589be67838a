"""Autoscaling on KV-cache utilization, end to end (issue #17; the closed-loop test covers queue depth): real runtime
metrics on the real control plane drive a scale-up because the running sequences fill the KV cache, not because of a
queue. Four long generations on one replica whose cache is small: `vllm:kv_cache_usage_perc` passes the target, the
operator scales 1 -> 2, and the decision, its metrics and the ScaledUp Event name the KV cache.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from e2e.load import StreamingLoad
from e2e.loop_run import loop_run, served_name
from e2e.operator_process import OperatorProcess
from e2e.workload import TARGET_KV_UTILIZATION, kv_loop_spec

pytestmark = [pytest.mark.k8s, pytest.mark.slow]

NAME = "kvloop"
SPEC = kv_loop_spec(evaluation_period_s=1)


def _kv_percent(reason: str) -> int:
    """The KV figure a decision's reason gives ("... KV 41%/replica (target 30%) ..."); -1 if it gives none."""
    match = re.search(r"KV (\d+)%/replica", reason)
    return int(match.group(1)) if match else -1


def test_kv_cache_utilization_drives_a_scale_up(
    k8s_cluster: Any, k8s_namespace: str, run_tag: str, e2e_operator: OperatorProcess, tmp_path: Path
) -> None:
    run_args = (k8s_cluster, k8s_namespace, NAME, SPEC, e2e_operator, tmp_path)
    with loop_run(*run_args, tag=f"{run_tag}-runtime", max_pods=2) as run:
        (pod,) = run.wait(lambda: run.kubelet.serving(), 180, "the first replica's runtime to serve /metrics")
        run.kubelet.hold()  # the second replica never needs to run
        load = StreamingLoad(pod.url("/v1"), served_name(pod), concurrency=4, max_tokens=400).start()
        try:
            up = run.wait(
                lambda: (s := run.observer.latest()) is not None and s.spec_replicas == 2 and s.decisions and s,
                180,
                "a scale-up to 2 replicas on KV-cache utilization",
            )
        finally:
            load.stop()
        assert not load.stats.errors, load.stats
        decision = up.decisions[-1]
        assert (decision["fromReplicas"], decision["toReplicas"]) == (1, 2), up.decisions
        assert _kv_percent(decision["reason"]) > TARGET_KV_UTILIZATION * 100, decision
        # what the operator saw when it decided: the cache past its target, and no queue to speak of
        scraped = [s.metrics for s in run.observer.timeline if s.metrics]
        assert max(m["kvCacheUtilization"] for m in scraped) > TARGET_KV_UTILIZATION, scraped
        assert max(m.get("queueDepth", 0) for m in scraped) < SPEC["autoscaling"]["targetQueueDepth"], scraped
        events = run.wait(lambda: run.events("ScaledUp"), 30, "a ScaledUp Event")
        assert any(_kv_percent(e.message or "") > TARGET_KV_UTILIZATION * 100 for e in events), [
            e.message for e in events
        ]

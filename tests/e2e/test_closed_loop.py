"""The closed loop, end to end (the operator issue's last acceptance item): real runtime metrics drive a scale-up
under load and a scale-down after it.

    control plane (kwok pods on loopback IPs) <── operator (subprocess) ── scrapes http://<podIP>:8000/metrics
          │ pods                                                                    ▲
          ▼                                                                         │
    RuntimeKubelet: one real `kubellm serve` (SmolLM2 on the CPU) per pod ──────────┘ <── streaming load (openai)

1. one replica; its runtime serves; the operator scrapes it.
2. load on pod 1 piles up `vllm:num_requests_waiting` over targetQueueDepth -> scale-up 1 -> 2, a decision in
   status and a ScaledUp Event naming the queue.
3. the load stops while the new pod's runtime is held back (a slow image pull): the pod is Ready (kwok) but its
   scrape fails. Past the scale-down window there is no load at all, and still no scale-down: no metrics from a
   replica is never a reason to remove capacity.
4. the runtime starts; once it is scraped, back down to minReplicas; its runtime stops; no process is left.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from e2e.load import StreamingLoad
from e2e.loop_run import loop_run, served_name
from e2e.operator_process import OperatorProcess
from e2e.workload import TARGET_QUEUE_DEPTH, closed_loop_spec

pytestmark = [pytest.mark.k8s, pytest.mark.slow]

NAME = "loop"
SCALE_DOWN_WINDOW_S = 5
EVALUATION_PERIOD_S = 1
SPEC = closed_loop_spec(evaluation_period_s=EVALUATION_PERIOD_S, scale_down_window_s=SCALE_DOWN_WINDOW_S)
# 8 clients, 2 running: ~6 waiting on one replica = 3x the target (the decision asks for 3, maxReplicas caps at 2).
CONCURRENCY = 8
MAX_TOKENS = 256


def _wall(iso: str) -> float:
    return datetime.strptime(iso, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()


def test_runtime_queue_drives_scale_up_and_back_down(
    k8s_cluster: Any, k8s_namespace: str, run_tag: str, e2e_operator: OperatorProcess, tmp_path: Path
) -> None:
    run_args = (k8s_cluster, k8s_namespace, NAME, SPEC, e2e_operator, tmp_path)
    t0 = time.monotonic()
    phases: dict[str, float] = {}  # seconds since the LLMDeployment was created, printed for the CI log

    def mark(phase: str) -> None:
        phases[phase] = round(time.monotonic() - t0, 1)

    with loop_run(*run_args, tag=f"{run_tag}-runtime", max_pods=3) as run:
        # 1. One replica: its runtime loads the model and serves; the operator scrapes it.
        (pod1,) = run.wait(lambda: run.kubelet.serving(), 180, "the first replica's runtime to serve /metrics")
        run.wait(
            lambda: run.latest().metrics.get("podsScraped") == 1 and run.latest().metrics.get("podsFailed") == 0,
            30,
            "the operator to scrape the first replica",
        )
        assert run.latest().spec_replicas == 1 and run.latest().deployment_replicas == 1
        mark("replica 1 scraped")

        # 2. Load on pod 1 until the operator scales up. Pods seen from now on wait for release() (image pull).
        run.kubelet.hold()
        load = StreamingLoad(pod1.url("/v1"), served_name(pod1), concurrency=CONCURRENCY, max_tokens=MAX_TOKENS).start()
        try:
            up = run.wait(
                lambda: (
                    (s := run.latest()).spec_replicas == 2
                    and s.deployment_replicas == 2
                    and s.desired_replicas == 2
                    and s
                ),
                120,
                "a scale-up to 2 replicas under load",
            )
            mark("scaled up")
        finally:
            load.stop()
        stopped_wall = time.time()
        assert not load.stats.errors, load.stats
        # What the operator scraped: replica 1 busy (its two sequences running) with a queue over the target. The
        # evaluation that decided wrote its metrics with the decision, just after the scale itself: wait for it.
        up_decisions = run.wait(lambda: run.latest().decisions, 30, "the scale-up decision (and its metrics) in status")
        scraped = [s.metrics for s in run.observer.timeline if s.metrics]
        assert max(m.get("queueDepth", 0) for m in scraped) > TARGET_QUEUE_DEPTH, scraped
        assert max(m.get("runningRequests", 0) for m in scraped) == SPEC["engine"]["maxNumSeqs"], scraped
        decision = up_decisions[-1]
        assert (decision["fromReplicas"], decision["toReplicas"]) == (1, 2), up_decisions
        assert "queue" in decision["reason"], decision
        scaled_up = run.wait(lambda: run.events("ScaledUp"), 30, "a ScaledUp Event")
        assert any("queue" in (e.message or "") for e in scaled_up), [e.message for e in scaled_up]

        # 3. The new pod is Ready (kwok) but its runtime is held back: its scrape fails. Wait for an evaluation
        # after the load is gone (nothing waiting or running) and past the scale-down window: the loop would scale
        # down now if it trusted the one replica it can see; it must hold at 2.
        pod2_name = run.wait(
            lambda: next((p.name for p in run.kubelet.live() if p.name != pod1.name), None), 60, "the second pod"
        )

        def idle_evaluation_past_window() -> bool:
            snap = run.latest()
            if snap.spec_replicas != 2 or snap.deployment_replicas != 2:
                raise AssertionError(
                    f"replicas moved to {snap.spec_replicas} (Deployment: {snap.deployment_replicas}) while pod "
                    f"{pod2_name} had no metrics: {snap.decisions[-1:]}"
                )
            m = snap.metrics
            return bool(
                m
                and m.get("podsFailed", 0) >= 1
                and m.get("queueDepth") == 0
                and m.get("runningRequests") == 0
                # the stamp is whole seconds: an evaluation just after the stop may carry the second it began in
                and _wall(m["time"]) > stopped_wall - 1
                # status.metrics is only rewritten when its numbers move (a quiet fleet writes nothing): the idle
                # snapshot above stands for every evaluation since, so wait out the window on the clock.
                and time.time() >= stopped_wall + SCALE_DOWN_WINDOW_S + 2 * EVALUATION_PERIOD_S
            )

        run.wait(idle_evaluation_past_window, 60, "an idle evaluation with a failed scrape, past the scale-down window")
        mark("held at 2 past the window")
        held = run.observer.since(up.at)
        assert all(s.spec_replicas == 2 and s.deployment_replicas == 2 for s in held), [
            (s.spec_replicas, s.deployment_replicas) for s in held
        ]
        assert not any(p.proc is not None for p in run.kubelet.live() if p.name == pod2_name), "pod 2 was not held"

        # 4. The runtime starts; once the operator scrapes it, the idle loop scales back down to minReplicas.
        run.kubelet.release()
        down = run.wait(
            lambda: (
                (s := run.latest()).spec_replicas == 1
                and s.deployment_replicas == 1
                and s.desired_replicas == 1
                # the decision is recorded just after the scale write itself
                and s.decisions[-1]["toReplicas"] == 1
                and s
            ),
            240,
            "a scale-down to minReplicas after the second runtime serves, recorded in status",
        )
        mark("scaled down")
        pod2 = run.kubelet.pods[pod2_name]
        assert pod2.serving_at is not None, "scaled down before the second replica's runtime ever served metrics"
        # The operator scrapes pod 2 before it scales down; the kubelet's probe may see it a poll or two later.
        first_down = next(s for s in run.observer.since(up.at) if s.spec_replicas == 1)
        assert first_down.at + 2.0 >= pod2.serving_at, (first_down.at, pod2.serving_at)
        decision = down.decisions[-1]
        assert (decision["fromReplicas"], decision["toReplicas"]) == (2, 1), down.decisions
        run.wait(lambda: run.events("ScaledDown"), 30, "a ScaledDown Event")
        # One replica is left, and only its runtime runs.
        run.wait(lambda: len(run.kubelet.live()) == 1, 60, "the removed pod's runtime to stop")
        gone = [p for p in run.kubelet.pods.values() if p.stopped_at is not None]
        run.wait(lambda: all(p.proc is None or p.proc.poll() is not None for p in gone), 30, "stopped runtimes to exit")
        assert not run.kubelet.errors, run.kubelet.errors

    mark("runtimes stopped")
    print(f"phases (s since create): {phases}; load: {load.stats}")

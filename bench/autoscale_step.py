"""How fast the closed loop answers a load step: real runtimes, real metrics, the real operator.

    PYTHONPATH=tests python -P bench/autoscale_step.py [--steps 3] [--evaluation-period 5] [--timer-interval 1]

The setup of tests/e2e/test_closed_loop.py, as a measurement: the test control plane (etcd, kube-apiserver,
controller-manager, scheduler, kwok nodes on loopback), `kubellm operator` as a subprocess, and for each pod a real
`kubellm serve` (SmolLM2-135M on the CPU, maxNumSeqs 2) bound to the pod's loopback IP. Each step: streaming load
on replica 1 (`--concurrency` clients, so about concurrency - 2 requests wait); measured from the load's start:
    queue built     replica 1's own /metrics reports more waiting requests than the target
    decision        spec.replicas moves 1 -> 2 (the scale-up decision, via the scale subresource)
    Deployment      the Deployment's replicas reach 2
    pod in API      the new pod is Ready in the API (kwok marks it without probing: API and scheduling latency)
    pod Ready       the new pod's runtime answers /ready, as its readiness probe would see it (model load here)
then the load stops and the loop returns to 1 replica (after scaleDownStabilizationSeconds) before the next step.
Writes bench/results/autoscale_step-<machine>.json (machine, versions, workload, numbers) and prints a table last.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "tests"))

from cluster import ClusterConfig, ControlPlane, ensure_binaries  # noqa: E402
from e2e.kubelet import RuntimeKubelet  # noqa: E402
from e2e.load import StreamingLoad  # noqa: E402
from e2e.observer import GROUP, PLURAL, VERSION, Observer, Snapshot  # noqa: E402
from e2e.operator_process import OperatorProcess  # noqa: E402
from e2e.procs import MARK_ENV, marked_processes, wait_for  # noqa: E402
from e2e.workload import TARGET_QUEUE_DEPTH, closed_loop_spec  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/machine.py
from machine import cpu_model, machine_name  # noqa: E402

NAME = "step"
NAMESPACE = "bench-step"


def kubernetes_version(apiserver: Path) -> str:
    out = subprocess.run([str(apiserver), "--version"], capture_output=True, text=True, check=False).stdout
    return out.strip().split()[-1] if out.strip() else "?"


def versions(apiserver: Path) -> dict[str, str]:
    from importlib.metadata import version

    found = {"python": platform.python_version(), "kubernetes": kubernetes_version(apiserver)}
    for dist in ("kubellm", "torch", "kopf", "kubernetes", "openai", "aiohttp"):
        try:
            found[dist if dist != "kubernetes" else "kubernetes_client"] = version(dist)
        except Exception:
            found[dist] = "?"
    return found


def latest(observer: Observer) -> Snapshot:
    snap = observer.latest()
    if snap is None:
        raise AssertionError(f"no snapshot of the LLMDeployment: {observer.errors[-3:]}")
    return snap


def waiting_requests(url: str) -> float:
    """vllm:num_requests_waiting from one runtime's /metrics (summed over model names); 0 when absent."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=2) as response:
        text = response.read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "vllm:num_requests_waiting"
    )


def one_step(kubelet: RuntimeKubelet, observer: Observer, args: argparse.Namespace) -> dict[str, float | None]:
    (pod1,) = wait_for(lambda: kubelet.serving(), timeout=300, what="one serving replica")
    name = pod1.args[pod1.args.index("--served-model-name") + 1]
    known = set(kubelet.pods)
    load = StreamingLoad(pod1.url("/v1"), name, concurrency=args.concurrency, max_tokens=args.max_tokens)
    t0 = time.monotonic()
    times: dict[str, float | None] = {}

    def since(t: float | None) -> float | None:
        return None if t is None else round(t - t0, 2)

    load.start()
    try:
        wait_for(
            lambda: waiting_requests(pod1.url("/metrics")) > TARGET_QUEUE_DEPTH,
            timeout=60,
            what="a queue on replica 1",
            interval=0.05,
        )
        times["runtime_queue_s"] = since(time.monotonic())
        wait_for(
            lambda: latest(observer).spec_replicas == 2,
            timeout=180,
            what="the scale-up decision",
        )
        new = wait_for(
            lambda: next((p for p in kubelet.serving() if p.name not in known), None),
            timeout=300,
            what="the new replica's runtime to serve",
        )
    finally:
        load.stop()
    stopped = time.monotonic()
    timeline = observer.since(t0)
    times["decision_s"] = since(next((s.at for s in timeline if s.spec_replicas == 2), None))
    times["deployment_scaled_s"] = since(next((s.at for s in timeline if s.deployment_replicas == 2), None))
    times["pod_in_api_s"] = since(new.ready_at)
    times["pod_ready_s"] = since(new.serving_at)
    times["load_chunks"] = float(load.stats.chunks)
    # Back to one replica before the next step (not part of the step's numbers, but reported).
    wait_for(
        lambda: latest(observer).spec_replicas == 1 and len(kubelet.live()) == 1,
        timeout=120,
        what="the scale-down after the load",
    )
    times["scale_down_after_load_stop_s"] = round(
        next(s.at for s in observer.since(stopped) if s.spec_replicas == 1) - stopped, 2
    )
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=8, help="streaming clients on replica 1")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--evaluation-period", type=int, default=5, help="spec.autoscaling.evaluationPeriodSeconds")
    parser.add_argument(
        "--scale-down-window", type=int, default=15, help="scaleDownStabilizationSeconds (more than one period)"
    )
    parser.add_argument("--pod-cidr", default="127.24.0.0/16", help="loopback range for pod IPs")
    parser.add_argument("--timer-interval", type=float, default=1.0, help="KUBELLM_TIMER_INTERVAL_SECONDS")
    args = parser.parse_args()
    load_at_start = os.getloadavg()[0]
    binaries = ensure_binaries()
    tag = f"bench-{os.getpid()}"
    steps: list[dict[str, float | None]] = []
    with tempfile.TemporaryDirectory(prefix="kubellm-autoscale-step-") as tmp_dir:
        tmp = Path(tmp_dir)
        # A pod CIDR of its own: tests running beside the benchmark would hand out the same loopback pod IPs.
        cp = ControlPlane(binaries, ClusterConfig(pod_cidr=args.pod_cidr), tmp / "cluster").start()
        op: OperatorProcess | None = None
        try:
            cp.kubectl("create", "namespace", NAMESPACE)
            cp.kubectl("wait", "--for=create", "serviceaccount/default", "-n", NAMESPACE, "--timeout=30s", timeout=40)
            env = {**cp.env(), MARK_ENV: tag, "KUBELLM_TIMER_INTERVAL_SECONDS": str(args.timer_interval)}
            op = OperatorProcess(NAMESPACE, env, tmp / "operator.log").start()
            api = cp.api_client()
            from kubernetes import client

            body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "LLMDeployment", "metadata": {"name": NAME}}
            client.CustomObjectsApi(api).create_namespaced_custom_object(
                GROUP,
                VERSION,
                NAMESPACE,
                PLURAL,
                {
                    **body,
                    "spec": closed_loop_spec(
                        evaluation_period_s=args.evaluation_period, scale_down_window_s=args.scale_down_window
                    ),
                },
            )
            logs = tmp / "runtimes"
            logs.mkdir()
            with (
                RuntimeKubelet(api, NAMESPACE, NAME, logs, cp.env(), tag=tag, max_pods=3) as kubelet,
                Observer(api, NAMESPACE, NAME) as observer,
            ):
                try:
                    for i in range(args.steps):
                        steps.append(one_step(kubelet, observer, args))
                        print(f"step {i + 1}/{args.steps}: {steps[-1]}", flush=True)
                except AssertionError:
                    print(f"last snapshot: {observer.latest()}", file=sys.stderr)
                    print(kubelet.report(), file=sys.stderr)
                    print(op.log_tail(20000), file=sys.stderr)
                    raise
            api.close()
        finally:
            if op is not None:
                op.stop()
            cp.stop()
    left = marked_processes(tag)
    if left:
        print(f"processes left behind: {left}", file=sys.stderr)
        return 1

    keys = ["runtime_queue_s", "decision_s", "deployment_scaled_s", "pod_in_api_s", "pod_ready_s"]
    summary: dict[str, dict[str, float]] = {}
    for key in [*keys, "scale_down_after_load_stop_s"]:
        values = [v for s in steps if (v := s.get(key)) is not None]
        if values:
            summary[key] = {"median": round(statistics.median(values), 2), "max": round(max(values), 2)}
    result: dict[str, Any] = {
        "machine": {
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "platform": platform.platform(),
            "load_avg_1m_at_start": round(load_at_start, 2),
        },
        "versions": versions(binaries.kube_apiserver),
        "workload": {
            "model": "builtin:smollm2-135m-instruct (GGUF Q4_1, dequantized), CPU, maxNumSeqs 2, OMP_NUM_THREADS 1",
            "load": f"{args.concurrency} streaming clients (max_tokens {args.max_tokens}) on replica 1",
            "policy": f"targetQueueDepth {TARGET_QUEUE_DEPTH}, minReplicas 1, maxReplicas 2, "
            f"evaluationPeriodSeconds {args.evaluation_period}, scaleDownStabilizationSeconds "
            f"{args.scale_down_window}",
            "operator": f"KUBELLM_TIMER_INTERVAL_SECONDS {args.timer_interval}, scrape timeout 1 s",
            "steps": args.steps,
        },
        "steps": steps,
        "summary": summary,
    }
    out_path = REPO_ROOT / "bench" / "results" / f"autoscale_step-{machine_name()}.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2) + "\n")

    labels = {
        "runtime_queue_s": "load start -> queue over target on replica 1",
        "decision_s": "load start -> scale-up decision",
        "deployment_scaled_s": "load start -> Deployment at 2",
        "pod_in_api_s": "load start -> new pod in the API (kwok Ready)",
        "pod_ready_s": "load start -> new pod Ready (runtime /ready)",
        "scale_down_after_load_stop_s": "load stop -> scale-down decision",
    }
    width = max(len(v) for v in labels.values())
    print(f"\nautoscale step ({result['machine']['cpu']}, {result['machine']['cores']} cores) -> {out_path}")
    print(f"  {'':<{width}}  {'median':>8}  {'max':>8}")
    for key, label in labels.items():
        if key in summary:
            print(f"  {label:<{width}}  {summary[key]['median']:>7.2f}s  {summary[key]['max']:>7.2f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

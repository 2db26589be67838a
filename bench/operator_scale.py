"""The operator at scale, against the test control plane (real etcd/apiserver/controller-manager/scheduler + kwok).

    PYTHONPATH=tests python -P bench/operator_scale.py [--count 200] [--steps 5]

1. `--count` LLMDeployments created at once (8 client threads): for each, the time from its create call returning
   to its Deployment appearing (watched), p50/p99/max; the time until all exist and until all report Ready;
   the operator's RSS (current and peak) and CPU seconds; then its CPU share at rest with the fleet loop
   running (the default 5 s interval).
2. Load steps: an LLMDeployment with builtin autoscaling (evaluationPeriodSeconds 5); a real HTTP server on its
   pod's IP renders the runtime's own /metrics; the queue depth steps from 0 to 8x the target; measured: the time
   until spec.replicas moves (the decision) and until the new pod is Ready. Repeated `--steps` times.
Writes bench/results/operator_scale-<machine>.json and prints a table last.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "tests"))

from aiohttp import web  # noqa: E402
from cluster import ClusterConfig, ControlPlane, ensure_binaries, wait_until  # noqa: E402
from kubernetes import client, watch  # noqa: E402

from kubellm.operator import constants as c  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/machine.py
from machine import cpu_model, machine_name  # noqa: E402

SOURCE = "builtin:smollm2-135m-instruct"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def proc_stats(pid: int) -> dict[str, float]:
    status = Path(f"/proc/{pid}/status").read_text()
    rss = int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024  # type: ignore[union-attr]
    hwm = int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) / 1024  # type: ignore[union-attr]
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) + int(fields[12])) / ticks  # utime + stime
    return {"rss_mib": round(rss, 1), "peak_rss_mib": round(hwm, 1), "cpu_s": round(cpu, 2)}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cp_get(url: str) -> bool:
    import urllib.request

    with urllib.request.urlopen(url, timeout=1) as response:
        return bool(response.status == 200)


def llmd(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": c.API_VERSION, "kind": c.KIND, "metadata": {"name": name}, "spec": spec}


def bench_create(api: Any, ns: str, count: int, op_pid: int) -> dict[str, Any]:
    custom: Any = client.CustomObjectsApi(api)
    apps: Any = client.AppsV1Api(api)
    created: dict[str, float] = {}
    appeared: dict[str, float] = {}
    names = [f"b{i:03d}" for i in range(count)]
    done = threading.Event()

    def watcher() -> None:
        w = watch.Watch()
        selector = f"{c.LABEL_MANAGED_BY}={c.MANAGED_BY}"
        for event in w.stream(apps.list_namespaced_deployment, ns, label_selector=selector, timeout_seconds=600):
            name = event["object"].metadata.name
            appeared.setdefault(name, time.monotonic())
            if len(appeared) >= count:
                break
        done.set()

    thread = threading.Thread(target=watcher, daemon=True)
    thread.start()
    time.sleep(0.5)  # let the watch establish before the first create

    spec = {"model": {"source": SOURCE}, "replicas": 1, "resources": {"gpus": 0}}

    def create(name: str) -> None:
        custom.create_namespaced_custom_object(c.GROUP, c.VERSION, ns, c.PLURAL, llmd(name, spec))
        created[name] = time.monotonic()

    start = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(create, names))
    created_all = time.monotonic() - start
    if not done.wait(timeout=600):
        raise RuntimeError(f"only {len(appeared)}/{count} Deployments appeared")
    all_deployments = max(appeared.values()) - start
    latencies = [appeared[n] - created[n] for n in names]

    def all_ready() -> bool:
        items = custom.list_namespaced_custom_object(c.GROUP, c.VERSION, ns, c.PLURAL)["items"]
        return sum(1 for o in items if (o.get("status") or {}).get("readyReplicas") == 1) == count

    wait_until(all_ready, timeout=900, what="every LLMDeployment Ready", interval=1.0)
    all_ready_s = time.monotonic() - start
    after = proc_stats(op_pid)
    # At rest: the fleet loop still ticks over every object (status refresh, writing nothing when nothing moved);
    # how much CPU does that take? Measured after a
    # 20 s settling time (the last status writes and their watch events), over 20 s.
    time.sleep(20)
    settled = proc_stats(op_pid)
    time.sleep(20)
    rest = proc_stats(op_pid)
    return {
        "count": count,
        "create_calls_s": round(created_all, 2),
        "until_all_deployments_s": round(all_deployments, 2),
        "deployment_latency_p50_s": round(percentile(latencies, 50), 3),
        "deployment_latency_p99_s": round(percentile(latencies, 99), 3),
        "deployment_latency_max_s": round(max(latencies), 3),
        "until_all_ready_s": round(all_ready_s, 2),
        "operator_after_convergence": after,
        "operator_rss_mib_at_rest": rest["rss_mib"],
        "operator_cpu_share_at_rest": round((rest["cpu_s"] - settled["cpu_s"]) / 20, 3),
    }


class MetricsServer:
    """A real HTTP server on a pod IP rendering the runtime's /metrics with a settable queue depth."""

    def __init__(self) -> None:
        self.waiting = 0
        self.loop = asyncio.new_event_loop()
        self.runners: list[web.AppRunner] = []
        threading.Thread(target=self.loop.run_forever, daemon=True).start()

    async def _metrics(self, request: web.Request) -> web.Response:
        from kubellm.runtime.outputs import EngineStats
        from kubellm.runtime.server.metrics import ServerMetrics

        stats = EngineStats(
            num_requests_waiting=self.waiting,
            num_requests_running=0,
            kv_cache_usage=0.0,
            num_gpu_blocks=1024,
            block_size=16,
        )
        return web.Response(body=ServerMetrics("bench", lambda: stats).render(), content_type="text/plain")

    def serve(self, ip: str) -> None:
        async def start() -> None:
            app = web.Application()
            app.router.add_get("/metrics", self._metrics)
            runner = web.AppRunner(app)
            await runner.setup()
            await web.TCPSite(runner, ip, c.CONTAINER_PORT).start()
            self.runners.append(runner)

        asyncio.run_coroutine_threadsafe(start(), self.loop).result(timeout=10)


def bench_load_step(api: Any, ns: str, steps: int) -> dict[str, Any]:
    custom: Any = client.CustomObjectsApi(api)
    core: Any = client.CoreV1Api(api)
    decision_s: list[float] = []
    ready_s: list[float] = []
    period = 5
    for i in range(steps):
        name = f"step{i}"
        spec = {
            "model": {"source": SOURCE},
            "replicas": 1,
            "resources": {"gpus": 0},
            "autoscaling": {
                "enabled": True,
                "minReplicas": 1,
                "maxReplicas": 2,
                "targetQueueDepth": 2,
                "evaluationPeriodSeconds": period,
            },
        }
        custom.create_namespaced_custom_object(c.GROUP, c.VERSION, ns, c.PLURAL, llmd(name, spec))
        server = MetricsServer()
        pod = wait_until(
            lambda n=name: next(
                (
                    p
                    for p in core.list_namespaced_pod(ns, label_selector=f"{c.LABEL_INSTANCE}={n}").items
                    if p.status.pod_ip
                ),
                None,
            ),
            timeout=120,
            what="the first pod's IP",
        )
        server.serve(pod.status.pod_ip)

        def get(n: str = name) -> dict[str, Any]:
            return dict(custom.get_namespaced_custom_object(c.GROUP, c.VERSION, ns, c.PLURAL, n))

        wait_until(lambda: (get().get("status") or {}).get("metrics") is not None, timeout=60, what="a first scrape")
        server.waiting = 16  # 8x the per-replica target
        t0 = time.monotonic()
        wait_until(lambda: get()["spec"]["replicas"] == 2, timeout=120, what="the scale-up decision", interval=0.05)
        decision_s.append(time.monotonic() - t0)
        wait_until(
            lambda: (get().get("status") or {}).get("readyReplicas") == 2, timeout=120, what="2 Ready", interval=0.05
        )
        ready_s.append(time.monotonic() - t0)
    return {
        "evaluation_period_s": period,
        "timer_interval_s": 5.0,
        "steps": steps,
        "to_decision_s": [round(x, 2) for x in decision_s],
        "to_decision_median_s": round(statistics.median(decision_s), 2),
        "to_ready_median_s": round(statistics.median(ready_s), 2),
        "to_decision_max_s": round(max(decision_s), 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="sample the operator with py-spy during the creates into this file (collapsed stacks); the run's "
        "figures are then not written (sampling costs the operator time)",
    )
    args = parser.parse_args()
    load_at_start = os.getloadavg()[0]
    binaries = ensure_binaries()
    with tempfile.TemporaryDirectory(prefix="kubellm-bench-") as tmp:
        # A pod range of its own: the load-step servers bind pod IPs, which must not collide with a test cluster's.
        cp = ControlPlane(binaries, ClusterConfig(pod_cidr="127.42.0.0/16"), Path(tmp) / "cluster").start()
        log = Path(tmp) / "operator.log"
        env = {**cp.env(), "PYTHONSAFEPATH": "1"}
        port = free_port()
        with log.open("wb") as out:
            cmd = [sys.executable, "-m", "kubellm.operator", "--liveness", f"http://127.0.0.1:{port}/healthz"]
            if args.profile is not None:
                cmd.append("--verbose")  # its log then names every API request (kept beside the profile)
            op = subprocess.Popen(cmd, env=env, stdout=out, stderr=out)
        try:
            api = cp.api_client()
            cp.kubectl("create", "namespace", "bench")
            cp.kubectl("wait", "--for=create", "serviceaccount/default", "-n", "bench", "--timeout=30s", timeout=40)
            # The operator's start-up (imports, login, first listings) is not what is measured.
            wait_until(lambda: cp_get(f"http://127.0.0.1:{port}/healthz"), timeout=60, what="the operator")
            spy = None
            if args.profile is not None:
                record = ["py-spy", "record", "--pid", str(op.pid), "--format", "raw", "-o", str(args.profile)]
                spy = subprocess.Popen([*record, "--rate", "50", "--subprocesses"])
            created = bench_create(api, "bench", args.count, op.pid)
            if spy is not None:
                spy.send_signal(2)  # SIGINT: py-spy writes what it sampled
                spy.wait(timeout=60)
                shutil.copy(log, args.profile.with_suffix(".log"))
                print(json.dumps(created, indent=2))
                return 0
            cp.kubectl("create", "namespace", "steps")
            cp.kubectl("wait", "--for=create", "serviceaccount/default", "-n", "steps", "--timeout=30s", timeout=40)
            steps = bench_load_step(api, "steps", args.steps)
        finally:
            op.terminate()
            op.wait(timeout=30)
            cp.stop()
    import kopf
    import kubernetes

    machine = {"cpu": cpu_model(), "cores": os.cpu_count()}
    result: dict[str, Any] = {
        "machine": {
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "platform": platform.platform(),
            "load_avg_1m_at_start": round(load_at_start, 2),
        },
        "versions": {
            "python": platform.python_version(),
            "kopf": kopf.__version__ if hasattr(kopf, "__version__") else "?",
            "kubernetes_client": kubernetes.__version__,
            "kubernetes": "v1.37.2",
        },
        "workload": {
            "create": f"{args.count} LLMDeployments (1 replica, no GPU) created by 8 threads at once",
            "load_step": "queue depth 0 -> 16 (target 2/replica) on one pod; maxReplicas 2",
        },
        "create": created,
        "load_step": steps,
    }
    out_path = REPO_ROOT / "bench" / "results" / f"operator_scale-{machine_name()}.json"
    out_path.write_text(json.dumps(result, indent=2) + "\n")
    rows = [
        ("LLMDeployments created at once", f"{created['count']}"),
        ("until every Deployment exists", f"{created['until_all_deployments_s']} s"),
        (
            "create -> Deployment p50 / p99 / max",
            f"{created['deployment_latency_p50_s']} / "
            f"{created['deployment_latency_p99_s']} / {created['deployment_latency_max_s']} s",
        ),
        ("until every LLMDeployment Ready", f"{created['until_all_ready_s']} s"),
        (
            "operator RSS after / peak",
            f"{created['operator_after_convergence']['rss_mib']} / "
            f"{created['operator_after_convergence']['peak_rss_mib']} MiB",
        ),
        (
            f"operator CPU at rest ({created['count']} objects in the loop)",
            f"{100 * created['operator_cpu_share_at_rest']:.1f} % of a core",
        ),
        (
            "load step -> scale-up decision (median/max)",
            f"{steps['to_decision_median_s']} / {steps['to_decision_max_s']} s",
        ),
        ("load step -> new replica Ready (median)", f"{steps['to_ready_median_s']} s"),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"\noperator at scale ({machine['cpu']}, {machine['cores']} cores) -> {out_path}")
    for label, value in rows:
        print(f"  {label:<{width}}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

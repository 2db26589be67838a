"""Stopping a control plane leaves no process and no listening port behind, whether it was started by the
fixture's class or by `python -m cluster up` (stopped by `down` from another process)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from cluster import (
    Binaries,
    BinariesUnavailable,
    ClusterConfig,
    ControlPlane,
    NodePool,
    ensure_binaries,
    listening_ports,
)

pytestmark = [pytest.mark.k8s, pytest.mark.slow]

REPO_ROOT = Path(__file__).resolve().parents[2]


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for init to reap it runs nothing and holds no port)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _binaries_or_skip() -> Binaries:
    try:
        return ensure_binaries()
    except BinariesUnavailable as exc:
        pytest.skip(str(exc))


def test_stop_leaves_no_process_and_no_listening_port(tmp_path: Path) -> None:
    config = ClusterConfig(node_pools=(NodePool("gpu", count=1, gpus=8),), crds_dir=None)
    control_plane = ControlPlane(_binaries_or_skip(), config, tmp_path)
    # Someone takes the apiserver's port between picking and binding: start() picks new ports and tries again.
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", control_plane.ports.apiserver))
        squatter.listen()
        taken = control_plane.ports.apiserver
        control_plane.start()
    assert control_plane.ports.apiserver != taken
    assert "address already in use" in (tmp_path / "logs" / "kube-apiserver.log").read_text()
    pids = control_plane.pids
    ports = set(control_plane.ports.all())
    try:
        assert len(pids) == 5 and all(_alive(pid) for pid in pids)
        # etcd's client and peer ports, the apiserver, controller manager and scheduler all listen while running.
        assert ports <= listening_ports()
    finally:
        control_plane.stop()
    assert [pid for pid in pids if _alive(pid)] == []
    assert ports & listening_ports() == set()


def _cluster_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-P", "-m", "cluster", *args],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def test_cli_up_then_down(tmp_path: Path) -> None:
    binaries = _binaries_or_skip()
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO_ROOT / "tests"),
        "KUBELLM_CLUSTER_DIR": str(tmp_path / "cluster"),
    }
    empty_crds = tmp_path / "no-crds"
    empty_crds.mkdir()
    up = _cluster_cli("up", "--crds-dir", str(empty_crds), env=env)
    state_path = tmp_path / "cluster" / "state.json"
    try:
        assert up.returncode == 0, up.stderr
        kubeconfig = up.stdout.strip()
        assert kubeconfig == str(tmp_path / "cluster" / "kubeconfig")
        state = json.loads(state_path.read_text())
        nodes = subprocess.run(
            [str(binaries.kubectl), f"--kubeconfig={kubeconfig}", "get", "nodes", "-o", "name"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout.split()
        assert len(nodes) == sum(pool.count for pool in ClusterConfig().node_pools)
        env_out = _cluster_cli("env", env=env)
        assert env_out.stdout.strip() == f"export KUBECONFIG={kubeconfig}"
        # A second `up` finds the running one instead of starting another.
        again = _cluster_cli("up", env=env)
        assert again.returncode == 0 and again.stdout.strip() == kubeconfig
    finally:
        down = _cluster_cli("down", env=env)
    assert down.returncode == 0, down.stderr
    pids = [p["pid"] for p in state["processes"]]
    assert [pid for pid in pids if _alive(pid)] == []
    assert set(state["ports"]) & listening_ports() == set()
    assert not state_path.exists()
    assert _cluster_cli("env", env=env).returncode == 1

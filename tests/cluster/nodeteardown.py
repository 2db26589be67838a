"""A real node's cgroups, and taking the node down so that the host is as it was (see realnode.py) from its
node-state.json alone, so that `python -m cluster down` can do it for a node another process started."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

from .controlplane import _terminate, wait_until
from .provision import cache_dir

CGROUP_MOUNT = Path("/sys/fs/cgroup")


def _readlink(path: str) -> str | None:
    try:
        return os.readlink(path)
    except OSError:
        return None


def _holder_namespaces(holder: dict[str, Any] | None) -> set[str]:
    """The node's own mount and network namespaces, never the host's (a holder that died before entering its
    namespaces, or a recycled pid, must not make us kill the host's processes)."""
    if holder is None:
        return set()
    found = {_readlink(f"/proc/{holder['pid']}/ns/{kind}") for kind in ("mnt", "net")}
    found |= {holder.get("mnt"), holder.get("net")}
    host = {_readlink(f"/proc/{pid}/ns/{kind}") for pid in ("self", "1") for kind in ("mnt", "net")}
    return {ns for ns in found if ns} - host


# What runs in the node's own namespaces: containerd's shims outlive it, the rest are transient children. A
# namespace's inode number can be reused once it is gone, so a stale record must not make us kill anything else.
NODE_NAMESPACE_EXES = frozenset(
    {"containerd", "containerd-shim-runc-v2", "runc", "ctr", "node", "xtables-nft-multi", "xtables-legacy-multi"}
    | {"bridge", "host-local", "portmap", "loopback"}
)


def _node_pids(namespaces: set[str], cgroup_name: str, spare: set[int]) -> list[int]:
    """Processes in the node's namespaces (containerd's shims) or under its cgroup root (the containers)."""
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) in spare:
            continue
        pid = int(entry.name)
        in_namespaces = {_readlink(f"/proc/{pid}/ns/mnt"), _readlink(f"/proc/{pid}/ns/net")} & namespaces
        if in_namespaces and os.path.basename(_readlink(f"/proc/{pid}/exe") or "") in NODE_NAMESPACE_EXES:
            pids.append(pid)
            continue
        with contextlib.suppress(OSError):
            paths = [line.split(":", 2)[-1] for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines()]
            if any(path == f"/{cgroup_name}" or path.startswith(f"/{cgroup_name}/") for path in paths):
                pids.append(pid)
    return pids


def _kill_node_processes(namespaces: set[str], cgroup_name: str, holder_pid: int | None) -> None:
    spare = {os.getpid(), *([holder_pid] if holder_pid else [])}

    def swept() -> bool:
        pids = _node_pids(namespaces, cgroup_name, spare)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return not pids

    wait_until(swept, timeout=30, what="the node's processes to exit", interval=0.1)


def _cgroup_dirs(cgroup_name: str) -> list[Path]:
    if not CGROUP_MOUNT.is_dir():
        return []
    return [
        hierarchy / cgroup_name
        for hierarchy in CGROUP_MOUNT.iterdir()
        if not hierarchy.is_symlink() and (hierarchy / cgroup_name).is_dir()
    ] + ([CGROUP_MOUNT / cgroup_name] if (CGROUP_MOUNT / cgroup_name).is_dir() else [])


def create_cgroups(cgroup_name: str) -> None:
    """The kubelet's cgroupRoot in every hierarchy (it refuses to start without them); removed by teardown."""
    for hierarchy in CGROUP_MOUNT.iterdir():
        if hierarchy.is_symlink() or not hierarchy.is_dir():
            continue
        (hierarchy / cgroup_name).mkdir(exist_ok=True)
        if (hierarchy / "cpuset.cpus").exists():  # cgroup v1 cpuset: a child starts empty and takes no tasks
            for name in ("cpuset.cpus", "cpuset.mems"):
                (hierarchy / cgroup_name / name).write_text((hierarchy / name).read_text())


def _remove_cgroups(cgroup_name: str) -> None:
    def removed() -> bool:
        for top in _cgroup_dirs(cgroup_name):
            for dirpath, _, _ in os.walk(top, topdown=False):
                with contextlib.suppress(OSError):  # busy until its last task is gone: retried
                    os.rmdir(dirpath)
        return not _cgroup_dirs(cgroup_name)

    wait_until(removed, timeout=30, what=f"the node's cgroups /{cgroup_name} to be removable", interval=0.1)


def registry_dir() -> Path:
    """~/.cache/kubellm/nodes/: one <node>.json per node started on this host, removed when it is stopped; what a
    killed test process leaves there is torn down by the next node's start (sweep_stale)."""
    return cache_dir().parent / "nodes"


def register(state: dict[str, Any]) -> None:
    folder = registry_dir()
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{state['name']}.tmp"
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    tmp.replace(folder / f"{state['name']}.json")


def unregister(name: str) -> None:
    (registry_dir() / f"{name}.json").unlink(missing_ok=True)


def _holder_alive(holder: dict[str, Any] | None) -> bool:
    if holder is None or holder.get("net") is None:
        return False
    return _readlink(f"/proc/{holder['pid']}/ns/net") == holder["net"]


def sweep_stale() -> list[str]:
    """Tears down every registered node whose holder is gone (its test process was killed: shims, containers, the
    veth and the cgroups outlive it); returns their names. A node whose holder runs is left alone."""
    swept = []
    for path in sorted(registry_dir().glob("*.json")):
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if _holder_alive(state.get("holder")):
            continue
        teardown(state)
        path.unlink(missing_ok=True)
        swept.append(state["name"])
    return swept


def teardown(state: dict[str, Any]) -> None:
    """Stops the components (newest first), kills what remains in the node's namespaces and cgroups, deletes the
    veth, stops the holder, removes the cgroups. Idempotent: what is already gone is skipped."""
    namespaces = _holder_namespaces(state.get("holder"))
    for process in reversed(state.get("processes", [])):
        # Only a pid still inside the node's namespaces is ours (not a recycled one).
        if {_readlink(f"/proc/{process['pid']}/ns/{k}") for k in ("mnt", "net")} & namespaces:
            _terminate(process["pid"])
    holder = state.get("holder")
    holder_pid = holder["pid"] if holder else None
    if namespaces:
        _kill_node_processes(namespaces, state["name"], holder_pid)
    if Path(f"/sys/class/net/{state['veth']}").exists():
        subprocess.run(["ip", "link", "delete", state["veth"]], check=False, capture_output=True)
    if holder_pid is not None and namespaces & {_readlink(f"/proc/{holder_pid}/ns/mnt")}:
        _terminate(holder_pid)
    _remove_cgroups(state["name"])
    # Had the delete failed, the veth goes with the holder's network namespace, asynchronously.
    veth = Path(f"/sys/class/net/{state['veth']}")
    wait_until(lambda: not veth.exists(), timeout=10, what=f"the veth {state['veth']} to be gone")

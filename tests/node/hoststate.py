"""What a real node could change on the host, read in one go, so that a test can compare before and after: links,
addresses, routes, nft and iptables rules, sysctls, mounts, cgroups, the node's processes and the default folders
containerd, the CNI plugins, the kubelet and buildah would write to."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

# Counters and clocks that move on their own (or with other work on the machine), not settings.
VOLATILE_SYSCTLS = re.compile(
    r"^(fs\.(dentry-state|file-nr|inode-nr|inode-state|quota\..*)|kernel\.(random\..*|ns_last_pid|pty\.nr|tainted)"
    r"|net\.netfilter\.nf_conntrack_count|vm\.stat_refresh|fs\.binfmt_misc\..*)$"
)
NODE_EXES = {"containerd", "containerd-shim-runc-v2", "runc", "node", "kubelet", "kube-proxy", "pause", "buildah"}
DEFAULT_PATHS = (
    "/run/netns", "/var/run/netns", "/etc/cni", "/var/lib/cni", "/opt/cni", "/run/containerd", "/var/lib/containerd",
    "/var/lib/kubelet", "/var/log/pods", "/var/log/containers", "/etc/kubernetes", "/var/lib/containers",
    "/run/containers",
)  # fmt: skip
CGROUP_MOUNT = Path("/sys/fs/cgroup")


def _cmd(*argv: str) -> str:
    if shutil.which(argv[0]) is None:
        return f"({argv[0]} not installed)"
    result = subprocess.run(list(argv), capture_output=True, text=True, check=False)
    return result.stdout + result.stderr


def _rules(text: str) -> list[str]:
    # iptables-save: drop its timestamp comments and packet counters
    return [re.sub(r"\[\d+:\d+\]", "", line) for line in text.splitlines() if not line.startswith("#")]


def _sysctls() -> dict[str, str]:
    values = {}
    for dirpath, _, files in os.walk("/proc/sys"):
        for name in files:
            path = os.path.join(dirpath, name)
            key = path.removeprefix("/proc/sys/").replace("/", ".")
            if VOLATILE_SYSCTLS.match(key):
                continue
            try:
                with open(path) as handle:
                    values[key] = handle.read().strip()
            except OSError:
                continue  # write-only or refused
    return values


def _node_processes() -> list[str]:
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            exe = os.path.basename(os.readlink(f"/proc/{entry.name}/exe"))
            cgroups = Path(f"/proc/{entry.name}/cgroup").read_text()
        except OSError:
            continue
        if exe in NODE_EXES or "/kubellm-node-" in cgroups:
            found.append(f"{entry.name} {exe}")
    return sorted(found)


def _cgroups() -> list[str]:
    return sorted(
        f"{hierarchy.name}/{child.name}"
        for hierarchy in CGROUP_MOUNT.iterdir()
        if hierarchy.is_dir() and not hierarchy.is_symlink()
        for child in hierarchy.iterdir()
        if child.is_dir()
    )


def snapshot() -> dict[str, object]:
    with open("/proc/self/mountinfo") as handle:
        mounts = sorted(" ".join(line.split()[4:6] + line.split(" - ")[1].split()[:2]) for line in handle)
    # Keys that change between two back-to-back reads are counters, not settings.
    first, second = _sysctls(), _sysctls()
    stable_sysctls = {k: v for k, v in first.items() if second.get(k, v) == v}
    return {
        "links": sorted(
            re.sub(r"^\d+: ", "", line.split(" link/")[0]) for line in _cmd("ip", "-o", "link").splitlines()
        ),
        "addresses": sorted(line.split(" valid_lft")[0] for line in _cmd("ip", "-o", "addr").splitlines()),
        "routes": _cmd("ip", "route", "show", "table", "all").splitlines(),
        "routes6": _cmd("ip", "-6", "route", "show", "table", "all").splitlines(),
        "nft": _cmd("nft", "list", "ruleset").splitlines(),
        "iptables": _rules(_cmd("iptables-save")),
        "iptables-legacy": _rules(_cmd("iptables-legacy-save")),
        "ip6tables": _rules(_cmd("ip6tables-save")),
        "sysctls": stable_sysctls,
        "mounts": mounts,
        "cgroups": _cgroups(),
        "processes": _node_processes(),
        "paths": [path for path in DEFAULT_PATHS if os.path.lexists(path)],
    }


def diff(before: dict[str, object], after: dict[str, object]) -> dict[str, tuple[object, object]]:
    """{facet: (only before, only after)} for every facet that differs."""
    changes: dict[str, tuple[object, object]] = {}
    for facet, old in before.items():
        new = after[facet]
        if isinstance(old, dict) and isinstance(new, dict):
            keys = {k for k in old.keys() | new.keys() if old.get(k) != new.get(k)}
            if keys:
                changes[facet] = ({k: old.get(k) for k in keys}, {k: new.get(k) for k in keys})
        elif old != new:
            old_set, new_set = set(old), set(new)  # type: ignore[call-overload]
            changes[facet] = (sorted(old_set - new_set), sorted(new_set - old_set))
    return changes

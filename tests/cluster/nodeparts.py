"""The real node's parts, provisioned into the same cache as the control plane (only when a real node is asked for):

    bin/node            hack/node built once: kubelet and kube-proxy v1.37.2 (it dispatches on argv[0]'s basename)
    bin/kubelet,        symlinks to node
    bin/kube-proxy
    node/pause.tar      the sandbox image: hack/node/pause/pause.c built statically, as an OCI archive
    node/.stamp.json    the key each part was built from (apart from bin/.stamp.json: the control plane's key
                        and start must not change because a node exists)

containerd 1.6 + runc, the CNI plugins, buildah and mmdebstrap are Debian's (hack/node-deps.sh, run by `make setup`).
We chose Debian's containerd 1.6 over 2.x from the Go module proxy: no build (2.x is ~1 min on a warm Go cache), the
same package users' Debian/Ubuntu hosts carry; its one gap is the CRI RuntimeConfig call, so the kubelet takes
`cgroupDriver: cgroupfs` from its own config and logs that 1.38 will want the runtime to answer.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from . import oci
from .provision import (
    KUBERNETES_VERSION,
    REPO_ROOT,
    WRAPPER_DIR,
    BinariesUnavailable,
    Log,
    _go,
    _locked,
    _log_stderr,
    cache_dir,
)

NODE_DIR = REPO_ROOT / "hack" / "node"
PAUSE_SOURCE = NODE_DIR / "pause" / "pause.c"  # not beside main.go: Go refuses C files in a package without cgo
NODE_NAMES = ("kubelet", "kube-proxy")
PAUSE_IMAGE = "registry.k8s.io/pause:kubellm"
# What the node needs from the host's packages (hack/node-deps.sh installs them).
SYSTEM_TOOLS = ("containerd", "ctr", "runc", "buildah", "mmdebstrap", "iptables", "nft", "unshare", "nsenter", "ip")
CNI_BIN_DIR = Path("/usr/lib/cni")
CNI_PLUGINS = ("bridge", "host-local", "loopback", "portmap")
HOW_TO_PROVIDE = "run `hack/node-deps.sh` as root (Debian packages), then `make node-up` builds the rest into the cache"


class NodeUnavailable(BinariesUnavailable):
    """The real node cannot run here: a system package or root is missing, or a build failed."""


def _run_or_raise(cmd: list[str], *, cwd: Path | None = None) -> None:
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        tail = (result.stdout + result.stderr)[-4000:]
        raise NodeUnavailable(f"`{' '.join(cmd)}` failed ({result.returncode}):\n{tail}\n{HOW_TO_PROVIDE}")


@dataclass(frozen=True)
class NodeParts:
    kubelet: Path
    kube_proxy: Path
    pause_archive: Path
    tools: dict[str, Path]  # SYSTEM_TOOLS resolved on PATH
    cni_bin_dir: Path


def _node_key() -> str:
    digest = hashlib.sha256()
    for path in (*(NODE_DIR / n for n in ("go.mod", "go.work", "go.work.sum", "main.go")), WRAPPER_DIR / "go.mod"):
        digest.update(path.read_bytes())
    return f"{KUBERNETES_VERSION}+{digest.hexdigest()[:16]}"


def _pause_key() -> str:
    return hashlib.sha256((PAUSE_SOURCE).read_bytes() + PAUSE_IMAGE.encode()).hexdigest()[:16]


def _system_tools() -> dict[str, Path]:
    if os.geteuid() != 0:
        raise NodeUnavailable(f"the real node needs root (network and mount namespaces, cgroups): {HOW_TO_PROVIDE}")
    found = {name: shutil.which(name) for name in SYSTEM_TOOLS}
    missing = [name for name, path in found.items() if path is None]
    missing += [f"{CNI_BIN_DIR}/{p}" for p in CNI_PLUGINS if not os.access(CNI_BIN_DIR / p, os.X_OK)]
    if missing:
        raise NodeUnavailable(f"missing {', '.join(missing)}: {HOW_TO_PROVIDE}")
    return {name: Path(path) for name, path in found.items() if path is not None}


def _build_node(bin_dir: Path, log: Log) -> None:
    ldflags = (
        f"-s -w -X k8s.io/component-base/version.gitVersion={KUBERNETES_VERSION} "
        "-X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=37"
    )
    log(f"building {NODE_DIR} (kubelet + kube-proxy {KUBERNETES_VERSION}); ~10 min with a cold Go build cache")
    tmp = bin_dir / ".node.tmp"
    _run_or_raise([_go(), "build", "-trimpath", "-ldflags", ldflags, "-o", str(tmp), "."], cwd=NODE_DIR)
    tmp.replace(bin_dir / "node")
    for name in NODE_NAMES:
        link = bin_dir / name
        link.unlink(missing_ok=True)
        link.symlink_to("node")
    for name in NODE_NAMES:
        result = subprocess.run([str(bin_dir / name), "--version"], capture_output=True, text=True, check=False)
        if KUBERNETES_VERSION not in result.stdout + result.stderr:
            raise NodeUnavailable(f"{bin_dir / name} --version: {(result.stdout + result.stderr)[-500:]}")


def _build_pause(node_dir: Path, log: Log) -> None:
    log("building the pause image (hack/node/pause/pause.c, static)")
    with tempfile.TemporaryDirectory(prefix="kubellm-pause-") as tmp:
        binary = Path(tmp) / "pause"
        _run_or_raise(["gcc", "-O2", "-static", "-s", "-o", str(binary), str(PAUSE_SOURCE)])
        layer = [oci.File("pause", binary.read_bytes(), 0o755)]
        oci.write_archive(node_dir / "pause.tar", PAUSE_IMAGE, layer, entrypoint=["/pause"], user="65535:65535")


def provision_node(log: Log = _log_stderr) -> NodeParts:
    """The node's parts, building what is missing or stale; raises NodeUnavailable when it cannot run here."""
    tools = _system_tools()
    root = cache_dir()
    bin_dir, node_dir = root / "bin", root / "node"
    wanted = {"node": _node_key(), "pause": _pause_key()}
    builders = {
        "node": (lambda: _build_node(bin_dir, log), [bin_dir / n for n in ("node", *NODE_NAMES)]),
        "pause": (lambda: _build_pause(node_dir, log), [node_dir / "pause.tar"]),
    }
    with _locked(root / ".lock", log):
        bin_dir.mkdir(parents=True, exist_ok=True)
        node_dir.mkdir(parents=True, exist_ok=True)
        stamp_path = node_dir / ".stamp.json"
        try:
            stamp = json.loads(stamp_path.read_text())
        except (OSError, ValueError):
            stamp = {}
        for part, (build, outputs) in builders.items():
            if stamp.get(part) == wanted[part] and all(p.exists() for p in outputs):
                continue
            start = time.monotonic()
            build()
            stamp[part] = wanted[part]
            stamp_path.write_text(json.dumps(stamp, indent=2, sort_keys=True) + "\n")
            log(f"{part}: done in {time.monotonic() - start:.1f} s")
    return NodeParts(
        kubelet=bin_dir / "kubelet",
        kube_proxy=bin_dir / "kube-proxy",
        pause_archive=node_dir / "pause.tar",
        tools=tools,
        cni_bin_dir=CNI_BIN_DIR,
    )

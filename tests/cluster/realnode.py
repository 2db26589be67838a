"""A real node beside the test control plane: containerd + runc + the CNI bridge, kubelet and kube-proxy, in a
network and a mount namespace of their own (layout in nodeconfig.py). Started by tests/node's fixture and by
`python -m cluster up --real-node`.

    holder      `unshare --net --mount` running `sleep`: owns both namespaces; its mount namespace has tmpfs over
                /run, /var/lib and /var/log (where containerd, the CNI plugins and the kubelet would write on the
                host), the node's standard folders (/var/lib/kubelet, /var/lib/containerd, /var/log/pods)
                bind-mounted from its state folder, and the kubelet's sysctls bind-mounted over /proc/sys
    containerd, kubelet, kube-proxy
                `nsenter` into the holder's namespaces (it execs: the pid is the component's)

Teardown (teardown(), also from node-state.json by another process) leaves the host as it was: stop the
components, kill whatever still runs in the node's namespaces or cgroups (shims, containers), delete the veth (its
route goes with it), kill the holder (its namespaces and their mounts go with it), remove the node's cgroups.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import nodeconfig, pki
from .controlplane import ControlPlane, ControlPlaneError, _die_with_parent, _Process, _tail, _terminate, wait_until
from .nodeconfig import NodeNetwork, NodePaths
from .nodeparts import PAUSE_IMAGE, NodeParts
from .nodeteardown import create_cgroups, register, sweep_stale, teardown, unregister

# Tmpfs in the node's mount namespace, over the host folders its components write to by default.
PRIVATE_TMPFS = ("/run", "/var/lib", "/var/log")
STATE_FILE = "node-state.json"


@dataclass
class RealNode:
    control_plane: ControlPlane
    parts: NodeParts
    network: NodeNetwork
    state_dir: Path
    tie_to_parent: bool = True
    startup_seconds: dict[str, float] = field(default_factory=dict)
    _holder: subprocess.Popen[bytes] | None = None
    _processes: list[_Process] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.network.name

    @property
    def paths(self) -> NodePaths:
        return NodePaths(self.state_dir)

    # -- lifecycle -----------------------------------------------------------------------------------------------

    def start(self) -> RealNode:
        t0 = time.monotonic()
        for name in sweep_stale():
            print(f"[node] tore down {name}, left running by a process that died", flush=True)
        for sub in ("logs", "sysctl", "containerd", "cni/net.d", "cni/ipam", "pod-logs", "kubelet"):
            (self.state_dir / sub).mkdir(parents=True, exist_ok=True)
        try:
            self._start_holder()
            self._wire_network()
            self._write_configs()
            self.startup_seconds["namespaces"] = round(time.monotonic() - t0, 3)
            self._start_containerd()
            self.ctr("images", "import", str(self.parts.pause_archive))
            self.startup_seconds["containerd"] = round(time.monotonic() - t0, 3)
            create_cgroups(self.name)
            self._start_kubelet()
            self._wait(self._ready, 120, f"node {self.name} Ready")
            self.startup_seconds["kubelet"] = round(time.monotonic() - t0, 3)
            self._start_kube_proxy()
            self._wait(lambda: "KUBE-SERVICES" in self.in_node("iptables-save").stdout, 60, "kube-proxy's rules")
            self.startup_seconds["ready"] = round(time.monotonic() - t0, 3)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for process in reversed(self._processes):
            _terminate(process.popen.pid, process.popen)  # ours: reaped here, not left as zombies
        teardown(self._state())
        unregister(self.name)
        if self._holder is not None:
            _terminate(self._holder.pid, self._holder)
        self._processes.clear()
        self._holder = None
        with contextlib.suppress(FileNotFoundError):
            (self.state_dir / STATE_FILE).unlink()

    def __enter__(self) -> RealNode:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- what tests use ------------------------------------------------------------------------------------------

    def crash(self) -> None:
        """SIGKILLs the holder and the components, as the kernel does when the process that started them dies
        (they are tied to it): what they started (shims, containers) keeps running, as after a real crash."""
        for popen in [p.popen for p in self._processes] + ([self._holder] if self._holder else []):
            popen.kill()
            popen.wait()
        self._processes.clear()
        self._holder = None

    def in_node(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Runs argv in the node's network and mount namespaces; text out."""
        assert self._holder is not None, "the node is not started"
        cmd = ["nsenter", f"--target={self._holder.pid}", "--net", "--mount", "--", *argv]
        result = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=600)
        if check and result.returncode != 0:
            raise ControlPlaneError(f"`{' '.join(argv)}` in node {self.name} failed: {result.stdout}{result.stderr}")
        return result

    def ctr(self, *args: str) -> subprocess.CompletedProcess[str]:
        """`ctr` against the node's containerd, in the CRI's namespace (where the kubelet finds images)."""
        return self.in_node("ctr", f"--address={self.paths.containerd_socket}", "--namespace=k8s.io", *args)

    def load_image(self, archive: Path, name: str | None = None) -> None:
        """Imports an OCI or docker archive into the node's containerd (no registry: pods use pullPolicy Never).
        name: the image's (images.py's names carry their content key): already there, nothing is imported again
        (a CPU runtime image takes minutes)."""
        if name is None or not self.ctr("images", "ls", "-q", f"name=={name}").stdout.strip():
            self.ctr("images", "import", str(archive))

    # -- internals -----------------------------------------------------------------------------------------------

    def _start_holder(self) -> None:
        sysctl_dir = self.state_dir / "sysctl"
        lines = ["set -e"]
        lines += [f"mount -t tmpfs -o mode=0755 kubellm-node {path}" for path in PRIVATE_TMPFS]
        for target, source in nodeconfig.NODE_BIND_MOUNTS.items():
            lines += [f"mkdir -p {target}", f"mount --bind {self.state_dir / source} {target}"]
        for key, value in nodeconfig.KUBELET_SYSCTLS.items():
            (sysctl_dir / key.replace("/", ".")).write_text(value + "\n")
            lines.append(f"mount --bind {sysctl_dir / key.replace('/', '.')} /proc/sys/{key}")
        lines += ["ip link set lo up", f"touch {self.state_dir / 'holder.ready'}", "exec sleep infinity"]
        (self.state_dir / "holder.ready").unlink(missing_ok=True)
        self._holder = subprocess.Popen(
            ["unshare", "--net", "--mount", "--propagation=private", "--", "sh", "-c", "\n".join(lines)],
            stdin=subprocess.DEVNULL,
            stdout=(self.state_dir / "logs" / "holder.log").open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent if self.tie_to_parent else None,
        )
        self._write_state()
        self._wait(lambda: (self.state_dir / "holder.ready").exists(), 30, "the node's namespaces")
        self._write_state()  # again: the holder's namespaces are its own only now

    def _wire_network(self) -> None:
        n, holder = self.network, self._holder
        assert holder is not None
        host = [
            ["ip", "link", "add", n.host_veth, "type", "veth", "peer", "name", "eth0", "netns", str(holder.pid)],
            ["ip", "addr", "add", f"{n.host_ip}/{n.link_prefix}", "dev", n.host_veth],
            ["ip", "link", "set", n.host_veth, "up"],
            ["ip", "route", "add", n.pod_cidr, "via", n.node_ip, "dev", n.host_veth],
        ]
        for argv in host:
            subprocess.run(argv, check=True, capture_output=True)
        self.in_node("ip", "addr", "add", f"{n.node_ip}/{n.link_prefix}", "dev", "eth0")
        self.in_node("ip", "link", "set", "eth0", "up")
        self.in_node("ip", "route", "add", "default", "via", n.host_ip)
        # Per network namespace: the node routes between eth0 and its pods' bridge; the host's stays as it is.
        self.in_node("sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward")

    def _write_configs(self) -> None:
        p, n, cp = self.paths, self.network, self.control_plane
        cert, key = pki.issue_client(
            cp.pki, self.state_dir / "pki", "kubelet", common_name=f"system:node:{n.name}", organization="system:nodes"
        )
        server = f"https://{n.host_ip}:{cp.ports.apiserver}"
        p.kubeconfig.write_text(nodeconfig.kubeconfig(server, cp.pki.ca_cert, cert, key))
        p.file("containerd.toml").write_text(nodeconfig.containerd_config(p, n, PAUSE_IMAGE, self.parts.cni_bin_dir))
        (p.root / "cni" / "net.d" / "10-kubellm.conflist").write_text(nodeconfig.cni_config(p, n))
        p.file("kubelet.yaml").write_text(nodeconfig.kubelet_config(p, n, cp.pki.ca_cert))
        p.file("kube-proxy.yaml").write_text(nodeconfig.kube_proxy_config(p, n))
        cp.kubectl("apply", "-f", "-", input=nodeconfig.node_rbac())

    def _start_containerd(self) -> None:
        self._spawn("containerd", ["containerd", f"--config={self.paths.file('containerd.toml')}"])
        self._wait(lambda: self.ctr("version").returncode == 0, 60, "containerd's socket")

    def _start_kubelet(self) -> None:
        self._spawn(
            "kubelet",
            [
                str(self.parts.kubelet),
                f"--config={self.paths.file('kubelet.yaml')}",
                f"--kubeconfig={self.paths.kubeconfig}",
                f"--hostname-override={self.name}",
                f"--node-ip={self.network.node_ip}",
                "--node-labels=kubellm.io/real-node=true",
            ],
        )

    def _start_kube_proxy(self) -> None:
        self._spawn("kube-proxy", [str(self.parts.kube_proxy), f"--config={self.paths.file('kube-proxy.yaml')}"])

    def _ready(self) -> bool:
        status, body = self.control_plane.get(f"/api/v1/nodes/{self.name}")
        if status != 200:
            return False
        conditions = json.loads(body).get("status", {}).get("conditions", [])
        return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)

    def _spawn(self, name: str, argv: list[str]) -> None:
        assert self._holder is not None
        log = self.state_dir / "logs" / f"{name}.log"
        with log.open("ab") as handle:
            popen = subprocess.Popen(
                ["nsenter", f"--target={self._holder.pid}", "--net", "--mount", "--", *argv],
                stdin=subprocess.DEVNULL,
                stdout=handle,
                stderr=subprocess.STDOUT,
                cwd=self.state_dir,
                start_new_session=True,
                preexec_fn=_die_with_parent if self.tie_to_parent else None,
            )
        self._processes.append(_Process(name, popen, log, argv))
        self._write_state()

    def _wait(self, predicate: object, timeout: float, what: str) -> None:
        def check() -> bool:
            for process in self._processes:
                if process.popen.poll() is not None:
                    code = process.popen.returncode
                    raise ControlPlaneError(f"{process.name} exited ({code}):\n{_tail(process.log)}")
            if self._holder is not None and self._holder.poll() is not None:
                raise ControlPlaneError(f"the node's holder exited:\n{_tail(self.state_dir / 'logs' / 'holder.log')}")
            return bool(predicate())  # type: ignore[operator]

        try:
            wait_until(check, timeout=timeout, what=what, interval=0.2)
        except TimeoutError as exc:
            logs = "\n".join(f"--- {p.name}:\n{_tail(p.log, 2000)}" for p in self._processes)
            raise ControlPlaneError(f"{exc}\n{logs}") from None

    def _state(self) -> dict[str, object]:
        holder = self._holder
        return {
            "name": self.name,
            "veth": self.network.host_veth,
            "holder": _proc_entry("holder", holder.pid) if holder is not None else None,
            "processes": [_proc_entry(p.name, p.popen.pid) for p in self._processes],
        }

    def _write_state(self) -> None:
        state = self._state()
        (self.state_dir / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
        if (self.state_dir / "holder.ready").exists():  # before, the holder's namespaces may still be the host's
            register(state)


def load_image_from_state(state_dir: Path, archive: Path, name: str, alias: str | None = None) -> None:
    """RealNode.load_image for a node another process started (`python -m cluster up --real-node`, a test's
    fixture), found by its node-state.json: imports the archive of image `name`, and tags it `alias` too (the name
    a manifest uses, e.g. the example's ghcr.io/kubellm/runtime:0.1.0-cpu)."""
    state = json.loads((state_dir / STATE_FILE).read_text())
    holder = state["holder"]
    if holder is None or _ns(int(holder["pid"]), "mnt") != holder["mnt"]:
        raise ControlPlaneError(f"the node of {state_dir} is not running")
    ctr = ["nsenter", f"--target={holder['pid']}", "--net", "--mount", "--", "ctr"]
    ctr += [f"--address={NodePaths(state_dir).containerd_socket}", "--namespace=k8s.io", "images"]
    present = subprocess.run([*ctr, "ls", "-q", f"name=={name}"], capture_output=True, text=True, check=True)
    steps = [] if present.stdout.strip() else [[*ctr, "import", str(archive)]]
    for argv in steps + ([[*ctr, "tag", "--force", name, alias]] if alias else []):
        out = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=900)
        if out.returncode != 0:
            raise ControlPlaneError(f"`{' '.join(argv[6:])}` in node {state['name']} failed: {out.stdout}{out.stderr}")


def _proc_entry(name: str, pid: int) -> dict[str, object]:
    return {"name": name, "pid": pid, "mnt": _ns(pid, "mnt"), "net": _ns(pid, "net")}


def _ns(pid: int, kind: str) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/{kind}")
    except OSError:
        return None

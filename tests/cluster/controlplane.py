"""A real Kubernetes control plane on loopback: etcd, kube-apiserver, kube-controller-manager, kube-scheduler and
kwok simulating CPU and GPU nodes. Started by the `k8s_cluster` test fixture and by `python -m cluster up`.

    ControlPlane(binaries, ClusterConfig(), state_dir).start()
      pki/         CA, apiserver serving cert, admin client cert (system:masters), service-account key pair
      kubeconfig   admin credentials; every component and every test uses it
      etcd/        etcd's data (no fsync: it is thrown away)
      logs/        one log per process
      state.json   pids and ports, so that `python -m cluster down` can stop a cluster started by `up`
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import yaml

from . import nodes, pki
from .provision import REPO_ROOT, Binaries

if TYPE_CHECKING:
    from kubernetes.client import ApiClient

SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"

# Only what the tests and the operator need: Deployments/ReplicaSets/garbage collection for the operator's objects,
# service accounts so that pods are admitted, namespaces that can be deleted, endpoint slices behind Services,
# PodDisruptionBudgets, StatefulSets (multi-node replica groups), Jobs and volume binding (a model cache's loader
# Job and claim, bound to a PersistentVolume the test creates). No node lifecycle (kwok nodes never go NotReady),
# no cloud provider.
CONTROLLERS = (
    "garbage-collector-controller",
    "replicaset-controller",
    "deployment-controller",
    "statefulset-controller",
    "job-controller",
    "persistentvolume-binder-controller",
    "serviceaccount-controller",
    "serviceaccount-token-controller",
    "namespace-controller",
    "endpointslice-controller",
    "disruption-controller",
    "root-ca-certificate-publisher-controller",
)


@dataclass(frozen=True)
class ClusterConfig:
    # Loopback, so end-to-end tests can run real processes on pods' own IPs (see nodes.py for the layout).
    pod_cidr: str = "127.16.0.0/16"
    # Virtual only: nothing routes or listens there; the apiserver just needs a range to hand out ClusterIPs from.
    service_cidr: str = "10.96.0.0/16"
    node_pools: tuple[nodes.NodePool, ...] = nodes.DEFAULT_NODE_POOLS
    crds_dir: Path | None = REPO_ROOT / "crds"
    start_timeout_s: float = 120.0
    # Set for a real node (tests/cluster/realnode.py): an address of this host that the node's pods can reach. The
    # apiserver then listens on every address, names this one and the `kubernetes` Service IP in its serving
    # cert, keeps the `kubernetes` endpoints with the lease reconciler and dials kubelets by InternalIP. Unset, the
    # control plane stays on loopback as before.
    advertise_address: str | None = None

    def __post_init__(self) -> None:
        nodes.layout(self.pod_cidr, self.node_pools)  # validates pod_cidr and that the nodes fit
        if self.start_timeout_s <= 0:
            raise ValueError(f"start_timeout_s must be > 0, got {self.start_timeout_s}")


class ControlPlaneError(RuntimeError):
    pass


def free_port() -> int:
    """A port free right now on 127.0.0.1 (the kernel picks it; another process could still take it first)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(predicate: Callable[[], Any], *, timeout: float, what: str, interval: float = 0.1) -> Any:
    """Polls predicate until it returns something truthy; raises TimeoutError naming what was awaited."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # the thing awaited may fail until it is up
            last_error = exc
        if time.monotonic() > deadline:
            detail = f" (last error: {last_error})" if last_error else ""
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}{detail}")
        time.sleep(interval)


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: if the test process dies without tearing down, the kernel kills us.
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGKILL)


@dataclass
class _Process:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    argv: list[str]


@dataclass
class Ports:
    etcd_client: int
    etcd_peer: int
    apiserver: int
    controller_manager: int
    scheduler: int

    @classmethod
    def pick(cls) -> Ports:
        # Keep all sockets open until every port is chosen, so no two names get the same one.
        socks = []
        try:
            for _ in range(5):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.bind(("127.0.0.1", 0))
                socks.append(sock)
            return cls(*(int(s.getsockname()[1]) for s in socks))
        finally:
            for sock in socks:
                sock.close()

    def all(self) -> list[int]:
        return [self.etcd_client, self.etcd_peer, self.apiserver, self.controller_manager, self.scheduler]


@dataclass
class ControlPlane:
    """A running control plane. `kubectl`, `api_client()`, `helm` and `pod_cidr` are what tests use."""

    binaries: Binaries
    config: ClusterConfig
    state_dir: Path
    # True for the test fixture (children die with the test process); False for `cluster up` (they outlive it).
    tie_to_parent: bool = True
    ports: Ports = field(default_factory=Ports.pick)
    startup_seconds: dict[str, float] = field(default_factory=dict)
    _processes: list[_Process] = field(default_factory=list)
    _pki: pki.Pki | None = None

    # -- what tests use ------------------------------------------------------------------------------------------

    @property
    def kubeconfig(self) -> Path:
        return self.state_dir / "kubeconfig"

    @property
    def helm(self) -> Path | None:
        return self.binaries.helm

    @property
    def pod_cidr(self) -> str:
        return self.config.pod_cidr

    @property
    def pki(self) -> pki.Pki:
        """The certificates (a real node's client cert is signed with its CA); only once started."""
        if self._pki is None:
            raise ControlPlaneError("the control plane is not started: no certificates yet")
        return self._pki

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.ports.apiserver}"

    @property
    def node_layout(self) -> list[nodes.NodeLayout]:
        return nodes.layout(self.config.pod_cidr, self.config.node_pools)[0]

    @property
    def pids(self) -> list[int]:
        return [p.popen.pid for p in self._processes]

    def env(self) -> dict[str, str]:
        """os.environ plus KUBECONFIG, for subprocesses (the operator, helm) that should talk to this cluster."""
        return {**os.environ, "KUBECONFIG": str(self.kubeconfig)}

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """Runs the provisioned kubectl (never one from PATH) against this cluster; text in, text out."""
        cmd = [
            str(self.binaries.kubectl),
            f"--kubeconfig={self.kubeconfig}",
            f"--cache-dir={self.state_dir / 'kubectl-cache'}",
            *args,
        ]
        result = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=timeout, check=False)
        if check and result.returncode != 0:
            raise ControlPlaneError(
                f"kubectl {' '.join(args)} failed ({result.returncode}):\n{result.stderr}{result.stdout}"
            )
        return result

    def api_client(self) -> ApiClient:
        """A new kubernetes.client.ApiClient for this cluster (close it when done)."""
        from kubernetes import config as k8s_config

        return k8s_config.new_client_from_config(config_file=str(self.kubeconfig))

    @contextlib.contextmanager
    def namespace(self, prefix: str = "test-", pod_security: str | None = "restricted") -> Iterator[str]:
        """A fresh namespace `<prefix><8 hex>`, deleted (without waiting) on exit. Pod Security Admission enforces
        `pod_security` there (restricted by default, as platform teams set it; None: the cluster default)."""
        name = f"{prefix}{uuid.uuid4().hex[:8]}"
        self.kubectl("create", "namespace", name)
        if pod_security is not None:
            levels = [f"pod-security.kubernetes.io/{mode}={pod_security}" for mode in ("enforce", "warn", "audit")]
            self.kubectl("label", "namespace", name, *levels)
        # Pods are refused until the service-account controller has created the namespace's default account.
        self.kubectl("wait", "--for=create", "serviceaccount/default", "-n", name, "--timeout=30s", timeout=40)
        try:
            yield name
        finally:
            self.kubectl("delete", "namespace", name, "--wait=false", check=False)

    def get(self, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
        """GET an apiserver path with the admin credentials; returns (status, body). Used for readiness polling."""
        assert self._pki is not None
        context = ssl.create_default_context(cafile=str(self._pki.ca_cert))
        context.load_cert_chain(str(self._pki.admin_cert), str(self._pki.admin_key))
        try:
            with urllib.request.urlopen(self.server + path, context=context, timeout=timeout) as response:
                return int(response.status), response.read()
        except urllib.error.HTTPError as exc:
            return int(exc.code), exc.read()

    # -- lifecycle -----------------------------------------------------------------------------------------------

    def start(self) -> ControlPlane:
        """Starts every process and waits until the API is ready, the nodes are Ready and the CRDs Established.
        On failure everything started so far is stopped and the error carries the failing process's log tail."""
        for attempt in range(3):
            try:
                self._start()
                return self
            except ControlPlaneError as exc:
                self.stop()
                # The ports were free when picked, but another process may have bound one since: pick again.
                if "address already in use" not in str(exc) or attempt == 2:
                    raise
                self.ports = Ports.pick()
            except BaseException:
                self.stop()
                raise
        raise AssertionError("unreachable")

    def _start(self) -> None:
        t0 = time.monotonic()
        deadline = t0 + self.config.start_timeout_s
        self.state_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.state_dir / "etcd", ignore_errors=True)  # a failed attempt's data: etcd would refuse it
        (self.state_dir / "logs").mkdir(exist_ok=True)
        self._pki = pki.generate(self.state_dir / "pki", extra_ips=self._in_cluster_ips())
        self._write_kubeconfig()
        self._mark("certificates", t0)

        self._start_etcd()
        self._wait(lambda: self._etcd_healthy(), deadline, "etcd /health")
        self._mark("etcd", t0)

        self._start_apiserver()
        self._wait(lambda: self.get("/readyz")[0] == 200, deadline, "kube-apiserver /readyz")
        self._mark("apiserver", t0)

        self._start_controller_manager()
        self._start_scheduler()
        self._start_kwok()
        self._write_state()
        self._create_nodes()
        self._wait(self._nodes_ready, deadline, "kwok nodes Ready")
        self._mark("nodes", t0)
        # The ServiceAccount admission plugin rejects pods until the namespace's default service account exists.
        self._wait(
            lambda: self.get("/api/v1/namespaces/default/serviceaccounts/default")[0] == 200,
            deadline,
            "the default service account",
        )
        self._apply_crds(deadline)
        self._mark("ready", t0)

    def stop(self) -> None:
        """Stops every process (SIGTERM, then SIGKILL after 10 s), newest first, and reaps it."""
        for process in reversed(self._processes):
            _terminate(process.popen.pid, process.popen)
        self._processes.clear()
        with contextlib.suppress(FileNotFoundError):
            (self.state_dir / "state.json").unlink()

    def restart(self, name: str, sig: signal.Signals = signal.SIGKILL) -> None:
        """Fault injection: signals one component (SIGKILL: a crash, no shutdown), waits for it to exit, starts it
        again with the same flags and data, and waits until it is healthy (etcd /health, kube-apiserver /readyz).
        The other components and every client are left to notice and reconnect on their own."""
        index, process = next((i, p) for i, p in enumerate(self._processes) if p.name == name)
        process.popen.send_signal(sig)
        process.popen.wait(timeout=30)
        self._processes[index] = self._popen(name, process.argv)
        healthy = {"etcd": self._etcd_healthy, "kube-apiserver": lambda: self.get("/readyz")[0] == 200}
        if name in healthy:
            self._wait(healthy[name], time.monotonic() + self.config.start_timeout_s, f"{name} to be healthy again")
        self._write_state()

    def __enter__(self) -> ControlPlane:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- internals -----------------------------------------------------------------------------------------------

    def _mark(self, stage: str, t0: float) -> None:
        self.startup_seconds[stage] = round(time.monotonic() - t0, 3)

    def _wait(self, predicate: Callable[[], Any], deadline: float, what: str) -> None:
        """Polls predicate until truthy; fails at once if one of our processes has exited, with its log tail."""
        last_error: Exception | None = None
        while True:
            for process in self._processes:
                if process.popen.poll() is not None:
                    raise ControlPlaneError(
                        f"{process.name} exited with {process.popen.returncode} while waiting for {what}; "
                        f"log {process.log}:\n{_tail(process.log)}"
                    )
            try:
                if predicate():
                    return
            except Exception as exc:  # not up yet: connection refused, 503, ...
                last_error = exc
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- {p.name} ({p.log}):\n{_tail(p.log, 1500)}" for p in self._processes)
                detail = f" (last error: {last_error})" if last_error else ""
                raise ControlPlaneError(f"timed out waiting for {what}{detail}\n{logs}")
            time.sleep(0.1)

    def _spawn(self, name: str, argv: list[str]) -> None:
        self._processes.append(self._popen(name, argv))

    def _popen(self, name: str, argv: list[str]) -> _Process:
        log = self.state_dir / "logs" / f"{name}.log"
        handle: IO[bytes] = log.open("ab")
        try:
            popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=handle,
                stderr=subprocess.STDOUT,
                cwd=self.state_dir,
                start_new_session=True,  # own process group: a Ctrl-C aimed at pytest reaches teardown, not us
                preexec_fn=_die_with_parent if self.tie_to_parent else None,
            )
        finally:
            handle.close()
        return _Process(name, popen, log, argv)

    def _write_kubeconfig(self) -> None:
        assert self._pki is not None
        kubeconfig = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "kubellm-test",
                    "cluster": {"server": self.server, "certificate-authority": str(self._pki.ca_cert)},
                }
            ],
            "users": [
                {
                    "name": "admin",
                    "user": {
                        "client-certificate": str(self._pki.admin_cert),
                        "client-key": str(self._pki.admin_key),
                    },
                }
            ],
            "contexts": [{"name": "kubellm-test", "context": {"cluster": "kubellm-test", "user": "admin"}}],
            "current-context": "kubellm-test",
        }
        self.kubeconfig.write_text(yaml.safe_dump(kubeconfig, sort_keys=False))
        self.kubeconfig.chmod(0o600)

    def _etcd_healthy(self) -> bool:
        url = f"http://127.0.0.1:{self.ports.etcd_client}/health"
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(json.loads(response.read()).get("health") == "true")

    def _start_etcd(self) -> None:
        client = f"http://127.0.0.1:{self.ports.etcd_client}"
        peer = f"http://127.0.0.1:{self.ports.etcd_peer}"
        self._spawn(
            "etcd",
            [
                str(self.binaries.etcd),
                "--name=default",
                f"--data-dir={self.state_dir / 'etcd'}",
                f"--listen-client-urls={client}",
                f"--advertise-client-urls={client}",
                f"--listen-peer-urls={peer}",
                f"--initial-advertise-peer-urls={peer}",
                f"--initial-cluster=default={peer}",
                "--unsafe-no-fsync=true",  # throwaway data; fsync dominates write latency on shared disks
                "--log-level=warn",
            ],
        )

    def _start_apiserver(self) -> None:
        assert self._pki is not None
        p = self._pki
        self._spawn(
            "kube-apiserver",
            [
                str(self.binaries.kube_apiserver),
                f"--etcd-servers=http://127.0.0.1:{self.ports.etcd_client}",
                *self._apiserver_address_flags(),
                f"--secure-port={self.ports.apiserver}",
                f"--cert-dir={self.state_dir / 'apiserver'}",
                f"--tls-cert-file={p.serving_cert}",
                f"--tls-private-key-file={p.serving_key}",
                f"--client-ca-file={p.ca_cert}",
                f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
                f"--service-account-key-file={p.service_account_pub}",
                f"--service-account-signing-key-file={p.service_account_key}",
                f"--service-cluster-ip-range={self.config.service_cidr}",
                "--authorization-mode=RBAC",
                "--allow-privileged=true",
                # No kubelet and no node lifecycle controller: nothing would lift the not-ready taint it adds.
                "--disable-admission-plugins=TaintNodesByCondition",
                # As OpenShift has it: setting ownerReferences needs `delete` on the object, and blockOwnerDeletion
                # `update` on the owner's finalizers subresource. (PodSecurity is on by default; namespaces opt in.)
                "--enable-admission-plugins=OwnerReferencesPermissionEnforcement",
                "--profiling=false",
            ],
        )

    def _in_cluster_ips(self) -> tuple[str, ...]:
        """The serving cert's extra IPs for a real node: its advertise address and the `kubernetes` Service IP."""
        if self.config.advertise_address is None:
            return ()
        return (self.config.advertise_address, str(ipaddress.ip_network(self.config.service_cidr)[1]))

    def _apiserver_address_flags(self) -> list[str]:
        if self.config.advertise_address is None:
            # The apiserver's own Endpoints for `kubernetes` would point at loopback, which validation refuses.
            return ["--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", "--endpoint-reconciler-type=none"]
        return [
            "--bind-address=0.0.0.0",  # loopback for the tests, the advertise address for the node's pods
            f"--advertise-address={self.config.advertise_address}",
            "--endpoint-reconciler-type=lease",
            # A real kubelet registers its hostname first; the node's IP is what reaches it (logs, port-forward),
            # with a client cert from the CA its x509 authentication trusts.
            "--kubelet-preferred-address-types=InternalIP",
            f"--kubelet-client-certificate={self.pki.admin_cert}",
            f"--kubelet-client-key={self.pki.admin_key}",
        ]

    def _component_flags(self, name: str, port: int) -> list[str]:
        return [
            f"--kubeconfig={self.kubeconfig}",
            f"--authentication-kubeconfig={self.kubeconfig}",
            f"--authorization-kubeconfig={self.kubeconfig}",
            "--bind-address=127.0.0.1",
            f"--secure-port={port}",
            f"--cert-dir={self.state_dir / name}",
            "--leader-elect=false",
            "--profiling=false",
        ]

    def _start_controller_manager(self) -> None:
        assert self._pki is not None
        self._spawn(
            "kube-controller-manager",
            [
                str(self.binaries.kube_controller_manager),
                *self._component_flags("kube-controller-manager", self.ports.controller_manager),
                f"--controllers={','.join(CONTROLLERS)}",
                f"--service-account-private-key-file={self._pki.service_account_key}",
                f"--root-ca-file={self._pki.ca_cert}",
                f"--service-cluster-ip-range={self.config.service_cidr}",
            ],
        )

    def _start_scheduler(self) -> None:
        self._spawn(
            "kube-scheduler",
            [
                str(self.binaries.kube_scheduler),
                *self._component_flags("kube-scheduler", self.ports.scheduler),
            ],
        )

    def _start_kwok(self) -> None:
        _, default_cidr = nodes.layout(self.config.pod_cidr, self.config.node_pools)
        config_path = self.state_dir / "kwok.yaml"
        config_path.write_text(nodes.kwok_config())
        self._spawn(
            "kwok",
            [
                str(self.binaries.kwok),
                f"--kubeconfig={self.kubeconfig}",
                f"--config={config_path}",
                "--manage-all-nodes=false",
                f"--manage-nodes-with-annotation-selector={nodes.KWOK_ANNOTATION}={nodes.KWOK_ANNOTATION_VALUE}",
                f"--cidr={default_cidr}",
                f"--node-ip={self.node_layout[0].internal_ip if self.node_layout else '127.0.0.1'}",
            ],
        )

    def _create_nodes(self) -> None:
        manifests = [nodes.node_manifest(node) for node in self.node_layout]
        if manifests:
            self.kubectl(
                "create", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": manifests})
            )

    def _nodes_ready(self) -> bool:
        status, body = self.get("/api/v1/nodes")
        if status != 200:
            return False
        ready = {
            item["metadata"]["name"]
            for item in json.loads(body)["items"]
            if any(c["type"] == "Ready" and c["status"] == "True" for c in item.get("status", {}).get("conditions", []))
        }
        return {node.name for node in self.node_layout} <= ready

    def _apply_crds(self, deadline: float) -> None:
        crds_dir = self.config.crds_dir
        if crds_dir is None or not crds_dir.is_dir():
            return
        files = sorted(p for p in crds_dir.iterdir() if p.suffix in (".yaml", ".yml"))
        if not files:
            return
        args = ["apply", "--server-side", "--force-conflicts", "-o", "name"]
        for path in files:
            args += ["-f", str(path)]
        names = self.kubectl(*args).stdout.split()
        crds = [n for n in names if n.startswith("customresourcedefinition")]
        if crds:
            timeout = max(int(deadline - time.monotonic()), 1)
            self.kubectl("wait", "--for=condition=Established", f"--timeout={timeout}s", *crds, timeout=timeout + 10)

    def _write_state(self) -> None:
        state = {
            "kubeconfig": str(self.kubeconfig),
            "server": self.server,
            "pod_cidr": self.config.pod_cidr,
            "ports": self.ports.all(),
            "processes": [{"name": p.name, "pid": p.popen.pid, "exe": str(_exe(p.popen.pid))} for p in self._processes],
        }
        (self.state_dir / "state.json").write_text(json.dumps(state, indent=2) + "\n")


def _exe(pid: int) -> Path | None:
    try:
        return Path(os.readlink(f"/proc/{pid}/exe"))
    except OSError:
        return None


def _terminate(pid: int, popen: subprocess.Popen[bytes] | None = None, grace_s: float = 10.0) -> None:
    """SIGTERM, wait up to grace_s, SIGKILL. Reaps the child when we started it (popen given)."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    if popen is not None:
        try:
            popen.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            popen.kill()
            popen.wait()
        return
    deadline = time.monotonic() + grace_s
    while _exe(pid) is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    if _exe(pid) is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        wait_until(lambda: _exe(pid) is None, timeout=10, what=f"pid {pid} to exit")


def stop_from_state(state_dir: Path) -> list[str]:
    """Stops the processes recorded by a cluster started with `up` (possibly by another Python process).
    A pid is signalled only if it still runs the binary recorded for it, so a recycled pid is left alone."""
    state_path = state_dir / "state.json"
    if not state_path.exists():
        return []
    state = json.loads(state_path.read_text())
    stopped = []
    for process in reversed(state["processes"]):
        exe = _exe(process["pid"])
        if exe is not None and str(exe) == process["exe"]:
            _terminate(process["pid"])
            stopped.append(f"{process['name']} (pid {process['pid']})")
    state_path.unlink()
    return stopped


def listening_ports() -> set[int]:
    """TCP ports in LISTEN state on this machine (from /proc/net/tcp{,6})."""
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError), open(table) as handle:
            next(handle)
            for line in handle:
                fields = line.split()
                if fields[3] == "0A":  # TCP_LISTEN
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def _tail(path: Path, limit: int = 3000) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return "(no log)"
    return data[-limit:].decode(errors="replace")

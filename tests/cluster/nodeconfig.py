"""PURE: the real node's addresses and its components' configuration files, from a NodeNetwork and a NodePaths.

    host                                   the node's network namespace
    ────                                   ───────────────────────────
    kube-apiserver 0.0.0.0:<port>          containerd, kubelet, kube-proxy (iptables), the CNI bridge cni0
    <veth> 172.31.N.1/30  ◀── veth ──▶     eth0 172.31.N.2/30, default route via 172.31.N.1
    route 10.244.N.0/24 via 172.31.N.2     cni0 10.244.N.1/24 ─▶ pods 10.244.N.2...

The host gains only the veth and its route (both go with the veth). Everything else (iptables rules, ip_forward,
the bridge) lives in the node's network namespace; machine-wide sysctls the kubelet insists on are bind-mounted
over /proc/sys inside its mount namespace only.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import yaml

# What the kubelet's protectKernelDefaults requires (pkg/kubelet/cm/container_manager_linux.go): it checks them
# instead of writing them, and the node's mount namespace shows it these values (the host keeps its own).
KUBELET_SYSCTLS = {
    "vm/overcommit_memory": "1",
    "vm/panic_on_oom": "0",
    "kernel/panic": "10",
    "kernel/panic_on_oops": "1",
    "kernel/keys/root_maxkeys": "1000000",
    "kernel/keys/root_maxbytes": "25000000",
}
CLUSTER_DOMAIN = "cluster.local"


@dataclass(frozen=True)
class NodeNetwork:
    index: int  # 1..250: picks 172.31.<index>.0/30 for the link and 10.244.<index>.0/24 for the pods

    def __post_init__(self) -> None:
        if not 1 <= self.index <= 250:
            raise ValueError(f"NodeNetwork.index must be in 1..250, got {self.index}")

    @classmethod
    def pick(cls) -> NodeNetwork:
        """A random free index, so two nodes on one machine (two sessions, or a test beside `make node-up`) differ."""
        free = [i for i in range(1, 251) if not Path(f"/sys/class/net/{cls(i).host_veth}").exists()]
        if not free:
            raise RuntimeError("no free real-node index: 250 kubellm-n* veths exist on this host")
        return cls(random.choice(free))

    @property
    def host_ip(self) -> str:
        return f"172.31.{self.index}.1"

    @property
    def node_ip(self) -> str:
        return f"172.31.{self.index}.2"

    @property
    def link_prefix(self) -> int:
        return 30

    @property
    def pod_cidr(self) -> str:
        return f"10.244.{self.index}.0/24"

    @property
    def host_veth(self) -> str:
        return f"kubellm-n{self.index}"

    @property
    def name(self) -> str:
        """The node's name and its cgroup root's name."""
        return f"kubellm-node-{self.index}"


# The node's standard folders, as its components see them in its mount namespace: bind mounts of folders under its
# state folder on the host (data stays on disk; unix socket paths stay short, as they must: 104 bytes at most).
NODE_BIND_MOUNTS = {
    "/var/lib/kubelet": "kubelet",
    "/var/lib/containerd": "containerd",
    "/var/log/pods": "pod-logs",
}
CONTAINERD_SOCKET = Path("/run/containerd/containerd.sock")  # on the node's private /run


@dataclass(frozen=True)
class NodePaths:
    root: Path  # the node's state folder on the host

    @property
    def containerd_socket(self) -> Path:
        return CONTAINERD_SOCKET

    @property
    def kubeconfig(self) -> Path:
        return self.root / "kubeconfig"

    def file(self, name: str) -> Path:
        return self.root / name


def containerd_config(paths: NodePaths, network: NodeNetwork, pause_image: str, cni_bin_dir: Path) -> str:
    # containerd 1.6's config v2. Its state (shim sockets, sandbox netns mounts) goes under /run, a tmpfs of the
    # node's mount namespace; its root (content, snapshots) is bind-mounted from the node's folder.
    cri = 'plugins."io.containerd.grpc.v1.cri"'
    return f"""version = 2
root = "/var/lib/containerd"
state = "/run/containerd"
oom_score = 0

[grpc]
  address = "{paths.containerd_socket}"

[{cri}]
  sandbox_image = "{pause_image}"
  # root here lacks CAP_SYS_RESOURCE: runc must not try to lower oom_score_adj below the shim's own
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  enable_cdi = false

[{cri}.containerd]
  snapshotter = "overlayfs"
  default_runtime_name = "runc"

[{cri}.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"

[{cri}.containerd.runtimes.runc.options]
  SystemdCgroup = false

[{cri}.cni]
  bin_dir = "{cni_bin_dir}"
  conf_dir = "{paths.root / "cni" / "net.d"}"
"""


def cni_config(paths: NodePaths, network: NodeNetwork) -> str:
    conflist = {
        "cniVersion": "1.0.0",
        "name": "kubellm",
        "plugins": [
            {
                "type": "bridge",
                "bridge": "cni0",
                "isGateway": True,
                "ipMasq": False,  # the host routes the pod subnet to the node: no NAT needed
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": network.pod_cidr}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": str(paths.root / "cni" / "ipam"),
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }
    return json.dumps(conflist, indent=2)


def kubelet_config(paths: NodePaths, network: NodeNetwork, ca_cert: Path) -> str:
    config = {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "address": network.node_ip,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "authentication": {
            "anonymous": {"enabled": False},
            "webhook": {"enabled": False},
            "x509": {"clientCAFile": str(ca_cert)},
        },
        "authorization": {"mode": "AlwaysAllow"},
        "containerRuntimeEndpoint": f"unix://{paths.containerd_socket}",
        # cgroup v1 (hybrid) here; cgroupfs because there is no systemd; a cgroup root of the node's own, removed
        # at teardown.
        "failCgroupV1": False,
        "cgroupDriver": "cgroupfs",
        "cgroupRoot": f"/{network.name}",
        "oomScoreAdj": 0,  # no CAP_SYS_RESOURCE: lowering it fails
        "protectKernelDefaults": True,  # check the sysctls (bind-mounted for it), never write them
        "failSwapOn": False,
        "resolvConf": "",  # no cluster DNS; pods get no resolv.conf from the host
        "clusterDomain": CLUSTER_DOMAIN,
        "podCIDR": network.pod_cidr,
        "maxPods": 30,
        "registerNode": True,
        "rotateCertificates": False,
        "serializeImagePulls": False,
        # The machine is shared: never evict for pressure someone else makes, never collect our imported images.
        "evictionHard": {"memory.available": "1Mi", "nodefs.available": "1%", "imagefs.available": "1%"},
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "shutdownGracePeriod": "0s",
    }
    return yaml.safe_dump(config, sort_keys=False)


def kube_proxy_config(paths: NodePaths, network: NodeNetwork) -> str:
    config = {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "clientConnection": {"kubeconfig": str(paths.kubeconfig)},
        "hostnameOverride": network.name,
        "mode": "iptables",
        "clusterCIDR": network.pod_cidr,
        "oomScoreAdj": 0,
        # The conntrack table is machine-wide: leave its size and timeouts as the host has them.
        "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s"},
        "healthzBindAddress": "127.0.0.1:10256",
        "metricsBindAddress": "127.0.0.1:10249",
    }
    return yaml.safe_dump(config, sort_keys=False)


def node_rbac() -> str:
    """The apiserver here is RBAC-only (no Node authorizer): the node's certificate (group system:nodes) gets the
    kubelet's and kube-proxy's built-in roles."""
    bindings = [
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": f"kubellm-nodes-{role.split(':')[-1]}"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": "system:nodes"}],
        }
        for role in ("system:node", "system:node-proxier")
    ]
    return json.dumps({"apiVersion": "v1", "kind": "List", "items": bindings})


def kubeconfig(server: str, ca_cert: Path, client_cert: Path, client_key: Path) -> str:
    return yaml.safe_dump(
        {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "kubellm", "cluster": {"server": server, "certificate-authority": str(ca_cert)}}],
            "users": [
                {"name": "node", "user": {"client-certificate": str(client_cert), "client-key": str(client_key)}}
            ],
            "contexts": [{"name": "node", "context": {"cluster": "kubellm", "user": "node"}}],
            "current-context": "node",
        },
        sort_keys=False,
    )

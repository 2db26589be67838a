"""The real node's pure parts, without a node: its addresses, its components' configuration, and the image cache's
content key (an unchanged tree does not rebuild; a change the build sees does)."""

from __future__ import annotations

import ipaddress
import json
import tomllib
from pathlib import Path

import pytest
import yaml
from cluster import images, nodeconfig
from cluster.nodeconfig import NodeNetwork, NodePaths

SERVICE_CIDR = ipaddress.ip_network("10.96.0.0/16")


@pytest.mark.parametrize("index", [1, 77, 250])
def test_the_node_network_is_consistent(index: int) -> None:
    n = NodeNetwork(index)
    link = ipaddress.ip_network(f"{n.host_ip}/{n.link_prefix}", strict=False)
    pods = ipaddress.ip_network(n.pod_cidr)
    assert ipaddress.ip_address(n.node_ip) in link and n.host_ip != n.node_ip
    assert not pods.overlaps(link) and not pods.overlaps(SERVICE_CIDR) and not link.overlaps(SERVICE_CIDR)
    assert len(n.host_veth) <= 15  # IFNAMSIZ - 1: a longer name is refused by the kernel


@pytest.mark.parametrize("index", [0, 251, -1])
def test_an_index_out_of_range_is_refused(index: int) -> None:
    with pytest.raises(ValueError, match="index"):
        NodeNetwork(index)


def test_the_components_configs_keep_the_host_untouched(tmp_path: Path) -> None:
    n, paths = NodeNetwork(9), NodePaths(tmp_path)
    containerd = tomllib.loads(nodeconfig.containerd_config(paths, n, "pause:x", Path("/usr/lib/cni")))
    cri = containerd["plugins"]["io.containerd.grpc.v1.cri"]
    assert cri["restrict_oom_score_adj"] and cri["netns_mounts_under_state_dir"]
    assert cri["cni"]["conf_dir"].startswith(str(tmp_path))
    # the node's own mount namespace: a bind mount from its folder, a tmpfs
    assert (containerd["root"], containerd["state"]) == ("/var/lib/containerd", "/run/containerd")
    assert set(nodeconfig.NODE_BIND_MOUNTS) >= {containerd["root"], "/var/lib/kubelet"}
    assert len(containerd["grpc"]["address"] + ".ttrpc") <= 104  # a unix socket path's limit

    kubelet = yaml.safe_load(nodeconfig.kubelet_config(paths, n, tmp_path / "ca.crt"))
    assert kubelet["protectKernelDefaults"] and kubelet["oomScoreAdj"] == 0
    assert (kubelet["cgroupDriver"], kubelet["cgroupRoot"]) == ("cgroupfs", f"/{n.name}")

    proxy = yaml.safe_load(nodeconfig.kube_proxy_config(paths, n))
    assert proxy["conntrack"]["maxPerCore"] == 0 and proxy["mode"] == "iptables"

    ipam = json.loads(nodeconfig.cni_config(paths, n))["plugins"][0]["ipam"]
    assert ipam["dataDir"].startswith(str(tmp_path)) and ipam["ranges"] == [[{"subnet": n.pod_cidr}]]


def test_the_image_key_follows_what_the_build_sees(tmp_path: Path) -> None:
    (tmp_path / ".dockerignore").write_text("*\n!app/\n**/__pycache__\n")
    (tmp_path / "Dockerfile").write_text("FROM base\nCOPY app/ /app/\n")
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "main.py").write_text("print(1)\n")
    (tmp_path / "notes.txt").write_text("not in the build\n")
    key = images.content_key(tmp_path / "Dockerfile", tmp_path, None, {"A": "1"})

    (tmp_path / "notes.txt").write_text("changed, still not in the build\n")
    (tmp_path / "app" / "__pycache__").mkdir()
    (tmp_path / "app" / "__pycache__" / "main.pyc").write_bytes(b"\0")
    assert images.content_key(tmp_path / "Dockerfile", tmp_path, None, {"A": "1"}) == key

    assert images.content_key(tmp_path / "Dockerfile", tmp_path, None, {"A": "2"}) != key
    assert images.content_key(tmp_path / "Dockerfile", tmp_path, "stage", {"A": "1"}) != key
    assert images.content_key(tmp_path / "Dockerfile", tmp_path, None, {"A": "1"}, {tmp_path: "/wheels"}) != key
    (tmp_path / "app" / "main.py").write_text("print(2)\n")
    assert images.content_key(tmp_path / "Dockerfile", tmp_path, None, {"A": "1"}) != key

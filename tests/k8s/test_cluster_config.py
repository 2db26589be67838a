"""Pure checks of the control plane's configuration and provisioning bookkeeping (no processes started)."""

from __future__ import annotations

import ipaddress
import json
import os
import threading
from pathlib import Path

import pytest
import yaml
from cluster import BinariesUnavailable, ClusterConfig, NodePool
from cluster import nodes as cluster_nodes
from cluster import provision as cluster_provision


def test_default_layout_puts_nodes_and_pods_in_disjoint_loopback_subnets() -> None:
    config = ClusterConfig()
    layout, default_cidr = cluster_nodes.layout(config.pod_cidr, config.node_pools)
    assert [n.name for n in layout] == ["kwok-cpu-0", "kwok-cpu-1", "kwok-gpu-0", "kwok-gpu-1"]
    assert [n.pool.gpus for n in layout] == [0, 0, 8, 8]
    subnets = [ipaddress.ip_network(n.pod_cidr) for n in layout] + [ipaddress.ip_network(default_cidr)]
    node_ips = [ipaddress.ip_address(n.internal_ip) for n in layout]
    for i, subnet in enumerate(subnets):
        assert subnet.is_loopback
        assert not any(ip in subnet for ip in node_ips)
        assert not any(subnet.overlaps(other) for other in subnets[i + 1 :])
    assert len(set(node_ips)) == len(node_ips)


@pytest.mark.parametrize(
    ("pod_cidr", "message"),
    [
        ("10.0.0.0/16", "127.0.0.0/8"),
        ("127.16.0.0/24", "prefix length"),
        ("127.16.0.1/16", "pod_cidr"),
        ("not-a-cidr", "pod_cidr"),
        ("127.16.0.0/22", "too few"),  # 4 subnets for 4 nodes + node IPs + kwok's default
    ],
)
def test_bad_pod_cidr_is_refused_naming_the_field(pod_cidr: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ClusterConfig(pod_cidr=pod_cidr)


def test_node_pool_validation() -> None:
    with pytest.raises(ValueError, match=r"NodePool\.gpus"):
        NodePool("gpu", count=1, gpus=-1)
    with pytest.raises(ValueError, match=r"NodePool\.name"):
        NodePool("GPU_nodes", count=1)


def test_gpu_node_manifest_advertises_gpus_and_kwok_annotation() -> None:
    layout, _ = cluster_nodes.layout("127.16.0.0/16", (NodePool("gpu", count=1, gpus=8),))
    manifest = cluster_nodes.node_manifest(layout[0])
    assert manifest["status"]["capacity"][cluster_nodes.GPU_RESOURCE] == "8"
    assert manifest["status"]["allocatable"][cluster_nodes.GPU_RESOURCE] == "8"
    assert manifest["metadata"]["annotations"][cluster_nodes.KWOK_ANNOTATION] == "fake"
    assert manifest["spec"]["podCIDR"] == "127.16.1.0/24"
    cpu_layout, _ = cluster_nodes.layout("127.16.0.0/16", (NodePool("cpu", count=1),))
    assert cluster_nodes.GPU_RESOURCE not in cluster_nodes.node_manifest(cpu_layout[0])["status"]["capacity"]


def test_kwok_config_is_yaml_with_node_and_pod_stages() -> None:
    docs = list(yaml.safe_load_all(cluster_nodes.kwok_config()))
    assert [d["kind"] for d in docs] == ["Stage"] * 6
    kinds = {d["metadata"]["name"]: d["spec"]["resourceRef"]["kind"] for d in docs}
    assert kinds == {
        "node-initialize": "Node",
        "pod-create": "Pod",
        "pod-ready": "Pod",
        "pod-delete": "Pod",
        "loader-succeed": "Pod",  # the operator's model loader pods (a Job's) finish
        "loader-fail": "Pod",
    }
    finished = {
        d["metadata"]["name"]: d["spec"]["next"]["statusTemplate"] for d in docs if "loader" in d["metadata"]["name"]
    }
    assert "phase: Succeeded" in finished["loader-succeed"] and "exitCode: 0" in finished["loader-succeed"]
    assert "phase: Failed" in finished["loader-fail"] and "exitCode: 2" in finished["loader-fail"]


def _fake_cache(root: Path) -> None:
    bin_dir = root / "bin"
    bin_dir.mkdir(parents=True)
    for files in cluster_provision._PART_FILES.values():
        for name in files:
            (bin_dir / name).write_text("#!/bin/sh\n")
            (bin_dir / name).chmod(0o755)
    (bin_dir / ".stamp.json").write_text(json.dumps(cluster_provision._wanted_keys()))


def test_stale_parts_follow_binaries_and_stamp(tmp_path: Path) -> None:
    assert sorted(cluster_provision._stale_parts(tmp_path)) == ["control-plane", "kubectl-helm", "kwok"]
    _fake_cache(tmp_path)
    assert cluster_provision._stale_parts(tmp_path) == []
    (tmp_path / "bin" / "kwok").unlink()
    assert cluster_provision._stale_parts(tmp_path) == ["kwok"]


def test_provision_waits_for_a_concurrent_provisioner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBELLM_CACHE_DIR", str(tmp_path))
    root = cluster_provision.cache_dir()
    _fake_cache(root)
    messages: list[str] = []
    held = threading.Event()
    release = threading.Event()

    def holder() -> None:
        with cluster_provision._locked(root / ".lock", messages.append):
            held.set()
            release.wait(10)

    thread = threading.Thread(target=holder)
    thread.start()
    assert held.wait(10)
    waiter = threading.Thread(target=lambda: cluster_provision.provision(log=messages.append))
    waiter.start()
    waiter.join(0.5)
    assert waiter.is_alive(), "provision() ran while another provisioner held the lock"
    release.set()
    thread.join(10)
    waiter.join(10)
    assert not waiter.is_alive()
    assert any("waiting for another provisioner" in m for m in messages)
    assert any("up to date" in m for m in messages)  # nothing stale: nothing rebuilt


def test_kubebuilder_assets_missing_binaries_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "etcd").write_text("")
    os.chmod(tmp_path / "etcd", 0o755)
    monkeypatch.setenv("KUBEBUILDER_ASSETS", str(tmp_path))
    with pytest.raises(BinariesUnavailable, match="lacks kube-apiserver, kube-controller-manager"):
        cluster_provision.find_binaries()


def test_kubebuilder_assets_take_precedence_over_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assets = tmp_path / "assets"
    assets.mkdir()
    for name in cluster_provision.REQUIRED_NAMES:
        (assets / name).write_text("#!/bin/sh\n")
        (assets / name).chmod(0o755)
    monkeypatch.setenv("KUBEBUILDER_ASSETS", str(assets))
    monkeypatch.setenv("KUBELLM_CACHE_DIR", str(tmp_path / "empty-cache"))
    binaries = cluster_provision.find_binaries()
    assert binaries is not None
    assert binaries.source == "KUBEBUILDER_ASSETS"
    assert binaries.kube_apiserver == assets / "kube-apiserver"
    assert binaries.kubectl == assets / "kubectl"
    assert binaries.helm is None  # neither in the assets nor in the (empty) cache


def test_an_incomplete_cache_is_not_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBEBUILDER_ASSETS", raising=False)
    monkeypatch.setenv("KUBELLM_CACHE_DIR", str(tmp_path))
    _fake_cache(cluster_provision.cache_dir())
    assert cluster_provision.find_binaries() is not None
    (cluster_provision.cache_dir() / "bin" / "kube-scheduler").unlink()
    assert cluster_provision.find_binaries() is None

"""`PYTHONPATH=tests python -m cluster up|down|env|provision`

provision  build or fetch the binaries into the cache (CI runs it before the tests, so the build shows apart)
up         start a control plane in the background (state in ~/.cache/kubellm/cluster/); prints the KUBECONFIG
           --real-node: with a real node beside it (containerd, kubelet, kube-proxy; see realnode.py), no kwok nodes
env        prints `export KUBECONFIG=...` for the running one: eval "$(python -m cluster env)"
image      build (cached by content) the project's images from Dockerfile.runtime on the local Debian base;
           --load NAME=REF ...: and import them into the real node (of `up --real-node`, or --node-dir), tagged REF
down       stop it (and its real node, leaving the host as it was)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from .controlplane import ClusterConfig, ControlPlane, stop_from_state
from .nodeconfig import NodeNetwork
from .nodeparts import provision_node
from .nodeteardown import teardown, unregister
from .provision import Binaries, BinariesUnavailable, ensure_binaries, provision
from .realnode import STATE_FILE, RealNode, load_image_from_state


def state_dir() -> Path:
    """$KUBELLM_CLUSTER_DIR, default ~/.cache/kubellm/cluster."""
    folder = os.environ.get("KUBELLM_CLUSTER_DIR")
    return Path(folder) if folder else Path.home() / ".cache" / "kubellm" / "cluster"


def _running(folder: Path) -> dict | None:
    state_path = folder / "state.json"
    if not state_path.exists():
        return None
    state = json.loads(state_path.read_text())
    alive = all(
        Path(f"/proc/{p['pid']}/exe").exists() and os.readlink(f"/proc/{p['pid']}/exe") == p["exe"]
        for p in state["processes"]
    )
    return state if alive else None


def _up(args: argparse.Namespace) -> int:
    folder = state_dir()
    state = _running(folder)
    if state is not None:
        print(f"already running ({state['server']})", file=sys.stderr)
        print(state["kubeconfig"])
        return 0
    stop_from_state(folder)  # leftovers of a half-dead cluster
    binaries = ensure_binaries()
    if args.real_node:
        return _up_with_node(args, folder, binaries)
    # A fresh cluster each time: the old certificates and etcd data belong to processes that are gone.
    for sub in ("etcd", "pki", "logs"):
        _remove_tree(folder / sub)
    control_plane = ControlPlane(
        binaries, ClusterConfig(pod_cidr=args.pod_cidr, crds_dir=args.crds_dir), folder, tie_to_parent=False
    )
    start = time.monotonic()
    control_plane.start()
    print(
        f"control plane up in {time.monotonic() - start:.1f} s: {control_plane.server}, "
        f"{len(control_plane.node_layout)} kwok nodes, pod CIDR {control_plane.pod_cidr}; logs in {folder / 'logs'}",
        file=sys.stderr,
    )
    print(control_plane.kubeconfig)
    return 0


def _up_with_node(args: argparse.Namespace, folder: Path, binaries: Binaries) -> int:
    parts = provision_node()
    for sub in ("etcd", "pki", "logs", "node"):
        _remove_tree(folder / sub)
    network = NodeNetwork.pick()
    config = ClusterConfig(
        pod_cidr=args.pod_cidr, crds_dir=args.crds_dir, node_pools=(), advertise_address=network.host_ip
    )
    control_plane = ControlPlane(binaries, config, folder, tie_to_parent=False).start()
    try:
        node = RealNode(control_plane, parts, network, folder / "node", tie_to_parent=False).start()
    except BaseException:
        control_plane.stop()
        raise
    print(
        f"control plane up: {control_plane.server}; real node {node.name} ({network.node_ip}, pods {network.pod_cidr}) "
        f"up in {node.startup_seconds['ready']} s; logs in {folder / 'logs'} and {folder / 'node' / 'logs'}",
        file=sys.stderr,
    )
    print(control_plane.kubeconfig)
    return 0


def _down(_: argparse.Namespace) -> int:
    node_state = state_dir() / "node" / STATE_FILE
    if node_state.exists():
        state = json.loads(node_state.read_text())
        teardown(state)
        unregister(state["name"])
        node_state.unlink()
        print("real node down", file=sys.stderr)
    stopped = stop_from_state(state_dir())
    print(f"stopped {', '.join(stopped)}" if stopped else "no cluster running", file=sys.stderr)
    return 0


def _env(_: argparse.Namespace) -> int:
    state = _running(state_dir())
    if state is None:
        print("no cluster running: start one with `make cluster-up`", file=sys.stderr)
        return 1
    print(f"export KUBECONFIG={state['kubeconfig']}")
    return 0


def _provision(_: argparse.Namespace) -> int:
    start = time.monotonic()
    timings = provision()
    print(json.dumps({"seconds": round(time.monotonic() - start, 1), "built": timings}))
    return 0


def _image(args: argparse.Namespace) -> int:
    from . import images, projectimages

    wanted = dict(item.split("=", 1) if "=" in item else (item, "") for item in args.images)
    unknown = sorted(set(wanted) - set(projectimages.BUILDERS))
    if unknown:
        raise ValueError(f"unknown image {', '.join(unknown)}: one of {', '.join(projectimages.BUILDERS)}")
    base = images.debian_base()
    for name, alias in wanted.items():
        image = projectimages.BUILDERS[name](base)
        print(f"{image.name}: " + (f"built in {image.built_s} s" if image.built_s else "cached"), file=sys.stderr)
        if args.load:
            start = time.monotonic()
            load_image_from_state(args.node_dir or state_dir() / "node", image.archive, image.name, alias or None)
            print(f"  loaded{f' as {alias}' if alias else ''} in {time.monotonic() - start:.1f} s", file=sys.stderr)
    return 0


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser("up", help="start a control plane in the background and print its KUBECONFIG")
    up.add_argument("--pod-cidr", default=ClusterConfig.pod_cidr, help="loopback range for pod IPs")
    up.add_argument("--crds-dir", type=Path, default=ClusterConfig.crds_dir, help="CRD YAMLs to apply (default crds/)")
    up.add_argument("--real-node", action="store_true", help="with a real node (root; hack/node-deps.sh's packages)")
    up.set_defaults(func=_up)
    commands.add_parser("down", help="stop the control plane started by up").set_defaults(func=_down)
    commands.add_parser("env", help="print `export KUBECONFIG=...`").set_defaults(func=_env)
    commands.add_parser("provision", help="build or fetch the binaries into the cache").set_defaults(func=_provision)
    image = commands.add_parser("image", help="build the project's images (and load them into the real node)")
    image.add_argument("images", nargs="+", metavar="NAME[=REF]", help="operator, runtime-cpu; =REF: a tag to load as")
    image.add_argument("--load", action="store_true", help="import into the running real node")
    image.add_argument("--node-dir", type=Path, help="the real node's state folder (default: that of `up`)")
    image.set_defaults(func=_image)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except (BinariesUnavailable, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

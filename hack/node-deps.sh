#!/bin/sh
# The real test node's system packages (tests/node, `make node-up`): containerd + runc, the CNI plugins, iptables
# and nftables for kube-proxy inside the node's network namespace, buildah + mmdebstrap for the images, and a
# static libc for the pause binary. Idempotent: installs only what is missing; needs root and apt (Debian 12).
set -eu
missing=""
need() { command -v "$1" >/dev/null 2>&1 || [ -e "$1" ] || missing="$missing $2"; }
need containerd containerd
need runc runc
need /usr/lib/cni/bridge containernetworking-plugins
need buildah buildah
need mmdebstrap mmdebstrap
need iptables iptables
need nft nftables
need gcc gcc
need /usr/lib/x86_64-linux-gnu/libc.a libc6-dev
[ -z "$missing" ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
	echo "node-deps: missing$missing; install them (Debian packages) as root" >&2
	exit 1
fi
echo "node-deps: installing$missing" >&2
apt-get update -qq
# policy-rc.d-style: never start the packaged services (the node runs its own containerd in its own namespaces).
DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 apt-get install -y -qq --no-install-recommends $missing >/dev/null

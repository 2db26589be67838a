#!/bin/sh
# The real test node's system packages (tests/node, `make node-up`): containerd + runc, the CNI plugins, iptables
# and nftables for kube-proxy inside the node's network namespace, buildah + mmdebstrap for the images, and gcc with
# a static libc for the pause binary. Idempotent: installs only what is missing; needs root and apt (Debian 12).
set -eu
set --
need() { command -v "$1" >/dev/null 2>&1 || [ -e "$1" ] || missing="${missing:-} $2"; }
need containerd containerd
need runc runc
need /usr/lib/cni/bridge containernetworking-plugins
need buildah buildah
need mmdebstrap mmdebstrap
need iptables iptables
need nft nftables
need gcc gcc
need "/usr/lib/$(uname -m)-linux-gnu/libc.a" libc6-dev
[ -z "${missing:-}" ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
	echo "node-deps: missing${missing}; install these Debian packages as root" >&2
	exit 1
fi
echo "node-deps: installing${missing}" >&2
for package in ${missing}; do set -- "$@" "$package"; done
apt-get update -qq
# The node never uses the packaged containerd service (where systemd starts it): it runs its own, in its own
# namespaces, with its own socket and state.
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null

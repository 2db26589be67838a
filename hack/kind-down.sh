#!/usr/bin/env bash
# Deletes the kind cluster that hack/kind-up.sh created (and everything in it).
#   make kind-down          (or: hack/kind-down.sh)
# KIND_CLUSTER_NAME names the cluster (kubellm).
set -euo pipefail

KIND_CLUSTER_NAME="${KIND_CLUSTER_NAME:-kubellm}"

command -v kind >/dev/null 2>&1 || { echo "error: kind is not on PATH" >&2; exit 1; }
if kind get clusters 2>/dev/null | grep -qx "${KIND_CLUSTER_NAME}"; then
  kind delete cluster --name "${KIND_CLUSTER_NAME}"
else
  echo "no kind cluster named ${KIND_CLUSTER_NAME}; nothing to do" >&2
fi

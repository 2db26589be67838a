#!/usr/bin/env bash
# The kind quick start: a local cluster serving the bundled SmolLM2 through the operator, end to end.
#
#   make kind-up                   (or: hack/kind-up.sh)
#
# Creates a kind cluster (reused if it exists), then runs hack/quickstart.sh against it (build the images, load
# them into the kind nodes, install the chart, apply examples/smollm2-cpu.yaml, wait for Ready, port-forward,
# stream a chat completion): the same script the test suite runs against its own real node.
#
# Needs docker, kind, kubectl, helm and curl on PATH. Settings (environment): KIND_CLUSTER_NAME (kubellm), and
# hack/quickstart.sh's (KUBELLM_NAMESPACE, DEMO_NAMESPACE, LOCAL_PORT, IMAGE_TAG, SKIP_BUILD=1, READY_TIMEOUT).
# hack/kind-down.sh deletes the cluster.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
KIND_CLUSTER_NAME="${KIND_CLUSTER_NAME:-kubellm}"

die() { printf '\033[1;31merror:\033[0m %s\n' "$*" >&2; exit 1; }

for tool in docker kind kubectl helm curl; do
  command -v "${tool}" >/dev/null 2>&1 || die "${tool} is not on PATH (see the README's quick start for what to install)"
done

printf '\033[1;34m==>\033[0m %s\n' "kind cluster ${KIND_CLUSTER_NAME}" >&2
if kind get clusters 2>/dev/null | grep -qx "${KIND_CLUSTER_NAME}"; then
  printf '\033[1;34m==>\033[0m %s\n' "reusing the existing cluster" >&2
else
  kind create cluster --name "${KIND_CLUSTER_NAME}" --wait 120s
fi
kubectl config use-context "kind-${KIND_CLUSTER_NAME}" >/dev/null

# kind's nodes pull from no local daemon: the images built by docker are copied in.
export KIND_CLUSTER_NAME
# shellcheck disable=SC2016
LOAD_IMAGES='kind load docker-image --name "${KIND_CLUSTER_NAME}" "${RUNTIME_IMAGE}" "${OPERATOR_IMAGE}"' \
  "${ROOT}/hack/quickstart.sh"
printf 'On kind cluster %s. Tear down: make kind-down   (or hack/kind-down.sh)\n' "${KIND_CLUSTER_NAME}" >&2

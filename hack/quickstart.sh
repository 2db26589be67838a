#!/usr/bin/env bash
# The quick start once a cluster exists (kubectl's current context, or $KUBECONFIG): what hack/kind-up.sh runs after
# creating a kind cluster and tests/node/test_quickstart.py runs after starting its real node, so that what users
# run is what CI runs.
#
# 1. builds the CPU runtime and the operator images     5. waits for the LLMDeployment to be Ready
# 2. loads them into the cluster's nodes                 6. port-forwards its Service to localhost
# 3. installs the Helm chart                             7. streams a chat completion with curl
# 4. applies the example (examples/smollm2-cpu.yaml)
#
# The cluster-specific steps are hooks, bash commands run with RUNTIME_IMAGE and OPERATOR_IMAGE exported (the
# names to build and load: the example's image and ghcr.io/kubellm/operator:<appVersion>):
#   BUILD_IMAGES   builds both under those names        (default: docker build of Dockerfile.runtime)
#   LOAD_IMAGES    makes them available on the nodes    (default: nothing, e.g. a registry's cluster)
# Settings (environment):
#   KUBELLM_NAMESPACE   the operator's namespace        (kubellm-system)
#   DEMO_NAMESPACE      namespace of the demo model     (default)
#   LOCAL_PORT          port forwarded on localhost     (8000)
#   IMAGE_TAG           tag of the operator image       (the chart's appVersion)
#   EXAMPLE             the manifest to apply           (examples/smollm2-cpu.yaml)
#   SKIP_BUILD=1        use images already built (still loaded)
#   READY_TIMEOUT       how long to wait for Ready      (15m)
# Needs kubectl, helm and curl on PATH (and what the hooks use).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CHART="${ROOT}/charts/kubellm"
EXAMPLE="${EXAMPLE:-${ROOT}/examples/smollm2-cpu.yaml}"

KUBELLM_NAMESPACE="${KUBELLM_NAMESPACE:-kubellm-system}"
DEMO_NAMESPACE="${DEMO_NAMESPACE:-default}"
LOCAL_PORT="${LOCAL_PORT:-8000}"
READY_TIMEOUT="${READY_TIMEOUT:-15m}"
SKIP_BUILD="${SKIP_BUILD:-0}"
# The default build is a user's docker build; the variables are expanded by the hook's own shell.
# shellcheck disable=SC2016
DEFAULT_BUILD='docker build -f "${ROOT}/Dockerfile.runtime" --build-arg VARIANT=cpu --target runtime -t "${RUNTIME_IMAGE}" "${ROOT}" && docker build -f "${ROOT}/Dockerfile.runtime" --target operator -t "${OPERATOR_IMAGE}" "${ROOT}"'
BUILD_IMAGES="${BUILD_IMAGES:-${DEFAULT_BUILD}}"
LOAD_IMAGES="${LOAD_IMAGES:-}"

log() { printf '\033[1;34m==>\033[0m %s\n' "$*" >&2; }
die() { printf '\033[1;31merror:\033[0m %s\n' "$*" >&2; exit 1; }

# The values of every `KEY: value` line of a YAML file, in order; enough for Chart.yaml and the example.
yaml_values() {
  local key="$1" file="$2"
  sed -n "s/^[[:space:]]*${key}:[[:space:]]*\"\{0,1\}\([^\"#]*[^\"#[:space:]]\)\"\{0,1\}[[:space:]]*\$/\1/p" "${file}"
}

for tool in kubectl helm curl; do
  command -v "${tool}" >/dev/null 2>&1 || die "${tool} is not on PATH (see the README's quick start for what to install)"
done
[[ -f "${EXAMPLE}" ]] || die "${EXAMPLE} is missing"

IMAGE_TAG="${IMAGE_TAG:-$(yaml_values appVersion "${CHART}/Chart.yaml" | head -n 1)}"
[[ -n "${IMAGE_TAG}" ]] || die "could not read appVersion from ${CHART}/Chart.yaml"
export ROOT
export OPERATOR_IMAGE="ghcr.io/kubellm/operator:${IMAGE_TAG}"
# The example names its image (the only `name:` with a tag); build exactly that one, so that the nodes serve it
# without pulling. The first `name:` is the LLMDeployment's, hence its Service's and model's name.
RUNTIME_IMAGE="$(yaml_values name "${EXAMPLE}" | grep -m 1 ':' || true)"
[[ -n "${RUNTIME_IMAGE}" ]] || die "could not read spec.image.name from ${EXAMPLE}"
export RUNTIME_IMAGE
MODEL_NAME="$(yaml_values name "${EXAMPLE}" | head -n 1)"

if [[ "${SKIP_BUILD}" != "1" ]]; then
  log "building ${RUNTIME_IMAGE} (CPU runtime with the bundled model) and ${OPERATOR_IMAGE}"
  bash -c "${BUILD_IMAGES}"
fi
if [[ -n "${LOAD_IMAGES}" ]]; then
  log "loading the images into the cluster's nodes"
  bash -c "${LOAD_IMAGES}"
fi

log "helm install kubellm into ${KUBELLM_NAMESPACE}"
helm upgrade --install kubellm "${CHART}" \
  --namespace "${KUBELLM_NAMESPACE}" --create-namespace \
  --set image.repository=ghcr.io/kubellm/operator --set image.tag="${IMAGE_TAG}" \
  --set image.pullPolicy=IfNotPresent \
  --wait --timeout 5m

log "applying ${EXAMPLE#"${ROOT}"/} in ${DEMO_NAMESPACE}"
kubectl -n "${DEMO_NAMESPACE}" apply -f "${EXAMPLE}"
log "waiting for llmdeployment/${MODEL_NAME} to be Ready (the model loads in the pod; up to ${READY_TIMEOUT})"
kubectl -n "${DEMO_NAMESPACE}" wait --for=condition=Ready "llmdeployment/${MODEL_NAME}" --timeout="${READY_TIMEOUT}"

log "port-forwarding service/${MODEL_NAME} to localhost:${LOCAL_PORT}"
kubectl -n "${DEMO_NAMESPACE}" port-forward "service/${MODEL_NAME}" "${LOCAL_PORT}:8000" >/dev/null &
FORWARD_PID=$!
trap 'kill "${FORWARD_PID}" 2>/dev/null || true' EXIT
BASE_URL="http://127.0.0.1:${LOCAL_PORT}"
for _ in $(seq 1 60); do
  if curl -fsS "${BASE_URL}/ready" >/dev/null 2>&1; then break; fi
  kill -0 "${FORWARD_PID}" 2>/dev/null || die "kubectl port-forward exited"
  sleep 1
done
curl -fsS "${BASE_URL}/ready" >/dev/null || die "${BASE_URL}/ready did not answer within a minute"

log "streaming a chat completion from ${BASE_URL}/v1/chat/completions"
curl -fsSN "${BASE_URL}/v1/chat/completions" \
  -H 'Content-Type: application/json' \
  -d "{\"model\": \"${MODEL_NAME}\", \"stream\": true, \"max_tokens\": 64,
       \"messages\": [{\"role\": \"user\", \"content\": \"Say hello to Kubernetes in one sentence.\"}]}"
echo

cat >&2 <<EOF2

kubellm is serving ${MODEL_NAME}. To talk to it again:
  kubectl -n ${DEMO_NAMESPACE} port-forward service/${MODEL_NAME} ${LOCAL_PORT}:8000
  curl ${BASE_URL}/v1/models
Status and scaling decisions: kubectl -n ${DEMO_NAMESPACE} describe llmdeployment ${MODEL_NAME}
EOF2

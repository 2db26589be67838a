#!/usr/bin/env bash
# Copies the canonical CRDs (crds/) into the Helm chart (charts/kubellm/files/crds/), which templates/crds.yaml
# installs. tests/deploy/test_chart.py fails while the two differ; run this after changing crds/.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${ROOT}/charts/kubellm/files/crds"

mkdir -p "${DEST}"
find "${DEST}" -maxdepth 1 -name '*.yaml' -delete
cp "${ROOT}"/crds/*.yaml "${DEST}/"
echo "copied $(find "${DEST}" -maxdepth 1 -name '*.yaml' | wc -l) CRD file(s) into ${DEST#"${ROOT}"/}" >&2

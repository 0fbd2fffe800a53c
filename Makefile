# Everything a fresh machine needs is installed from here: no hand-installed packages.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed-dev
# NIXL (cross-node passing, docs/network.md), pinned in images/nixl-requirements.txt: its
# wheel declares torch (~5 GB), which the NumPy path the sidecar uses never imports, so it
# is installed without dependencies.
NIXL_REQ    = images/nixl-requirements.txt
NIXL_STAMP  = $(VENV)/.installed-nixl

.PHONY: setup test demo dataplane-demo lint clean gpu-wheels
.PHONY: podman-setup base-image images image-names image-test images-push

setup: $(STAMP) $(NIXL_STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

$(NIXL_STAMP): $(STAMP) $(NIXL_REQ)
	$(BIN)/python -m pip install -q --no-deps -r $(NIXL_REQ)
	touch $(NIXL_STAMP)

# The project's main job on one machine: run an example workflow locally
# (a sidecar, the gateway and one process per function; CUDA backend where a GPU is visible).
demo: setup
	$(BIN)/faastube run examples/traffic/workflow.yaml --requests 20

# Just the data plane: a sidecar and two function processes passing tensors.
dataplane-demo: setup
	$(BIN)/faastube demo

test: setup
	$(BIN)/python -m pytest -q -ra

lint: setup
	$(BIN)/ruff check sidecar operator tests bench hack
	$(BIN)/mypy sidecar/faastube sidecar/faastube_spec sidecar/faastube_placement sidecar/faastube_autoscale sidecar/faastube_sidecar operator/faastube_operator

clean:
	rm -rf $(VENV) build *.egg-info

# Wheels the lent GPU machine lacks (Python 3.12, no network there): bench/gpu_all.sh installs
# what is in .whl; pass carry: [".whl"] to the device tool.
gpu-wheels: setup
	rm -rf .whl
	$(BIN)/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
		--platform manylinux_2_28_x86_64 -d .whl -r $(NIXL_REQ) pytest-asyncio

# ---------------------------------------------------------------------------------------
# Container images (docs/images.md). Rootful podman; `make podman-setup` installs it.
# The names are the ones the chart (charts/faastube/values.yaml, appVersion), the
# operator's --image default and the examples' workflow.yaml files refer to; to push to
# a registry of your own: make images images-push REGISTRY=registry.example.com/you
PODMAN         ?= podman
VERSION        := $(shell sed -n 's/^version = "\(.*\)"$$/\1/p' pyproject.toml)
REGISTRY       ?= ghcr.io/faastube
TAG            ?= $(VERSION)
BASE_IMAGE     ?= localhost/faastube-base:bookworm
DAEMON_IMAGE   ?= $(REGISTRY)/faastube:$(TAG)
FUNCTION_IMAGE ?= $(REGISTRY)/function:$(TAG)
FUNCTION_CUDA_IMAGE ?= $(REGISTRY)/function:$(TAG)-cuda
EXAMPLES_IMAGE ?= $(REGISTRY)/examples:$(TAG)
IMAGES          = $(DAEMON_IMAGE) $(FUNCTION_IMAGE) $(FUNCTION_CUDA_IMAGE) $(EXAMPLES_IMAGE)
# The CA bundle pip trusts inside the build: a build secret, in no layer of the images.
PIP_CA         ?= $(or $(wildcard /etc/ssl/certs/ca-certificates.crt),/dev/null)
# Labels that change between builds go on the command line: podman 4.3's layer cache
# ignores build-arg values, so a LABEL made of ARGs kept the first build's values.
IMAGE_BUILD     = $(PODMAN) build --layers --secret id=pip-ca,src=$(PIP_CA) \
	--label org.opencontainers.image.version=$(VERSION) \
	--label org.opencontainers.image.revision=$$(git rev-parse --short HEAD 2>/dev/null || echo unknown) \
	--label io.faastube.image.source-digest=$$(python3 hack/source_digest.py)

# Installs podman, buildah, runc and mmdebstrap (Debian) and writes the containers.conf
# settings these machines need. Root only.
podman-setup:
	bash hack/podman-setup.sh

# Debian bookworm + python3, from the Debian mirror (no registry needed).
base-image:
	PODMAN=$(PODMAN) bash hack/base-image.sh $(BASE_IMAGE)

images: base-image
	$(IMAGE_BUILD) -f images/daemon.Containerfile --build-arg BASE_IMAGE=$(BASE_IMAGE) -t $(DAEMON_IMAGE) .
	$(IMAGE_BUILD) -f images/function.Containerfile --build-arg BASE_IMAGE=$(BASE_IMAGE) --build-arg CUDA=0 \
		--label io.faastube.image.cuda=0 -t $(FUNCTION_IMAGE) .
	$(IMAGE_BUILD) -f images/function.Containerfile --build-arg BASE_IMAGE=$(BASE_IMAGE) --build-arg CUDA=1 \
		--label io.faastube.image.cuda=1 -t $(FUNCTION_CUDA_IMAGE) .
	$(IMAGE_BUILD) -f images/examples.Containerfile --build-arg FUNCTION_IMAGE=$(FUNCTION_CUDA_IMAGE) \
		-t $(EXAMPLES_IMAGE) .
	@for image in $(IMAGES); do \
		echo "$$image $$($(PODMAN) image inspect --format '{{.Size}}' $$image | awk '{printf "%.0f MB", $$1/1e6}')"; \
	done

# What the image test reads: one `role=name` a line.
image-names:
	@printf 'base=%s\ndaemon=%s\nfunction=%s\nfunction-cuda=%s\nexamples=%s\n' \
		$(BASE_IMAGE) $(DAEMON_IMAGE) $(FUNCTION_IMAGE) $(FUNCTION_CUDA_IMAGE) $(EXAMPLES_IMAGE)

# Build the images, then run them: faastube --help, the sidecar on a read-only root,
# put/get from the function image, a workflow served by the examples image.
image-test: setup images
	$(BIN)/python -m pytest -q -ra tests/e2e/test_images_podman.py

images-push:
	for image in $(IMAGES); do $(PODMAN) push $$image || exit 1; done

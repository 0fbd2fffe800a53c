# Everything a fresh machine needs is installed from here: no hand-installed packages.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed-dev

.PHONY: setup test demo dataplane-demo lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

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
	$(BIN)/ruff check sidecar operator tests bench
	$(BIN)/mypy sidecar/faastube sidecar/faastube_spec sidecar/faastube_placement sidecar/faastube_autoscale sidecar/faastube_sidecar operator/faastube_operator

clean:
	rm -rf $(VENV) build *.egg-info

# Two commands: `make run` (the demo pipeline) and `make test` (the suite).
# Both create or reuse .venv and install the project with the exact versions in
# constraints.txt (torch 2.13.0 there, so pip takes the local CPU wheel).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PRESET ?= demo
# an extra package index for torch, e.g. https://download.pytorch.org/whl/cpu for the CPU build where
# pip's configuration offers none (PyPI's torch is the CUDA build)
TORCH_INDEX ?=
# processes the suite runs on (pytest-xdist): its end-to-end tests wait on servers and
# subprocesses, so two keep two cores busy where one process keeps about one
TEST_WORKERS ?= 2

export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export MLFLOW_DISABLE_TELEMETRY := true
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: run test stack-test install clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX)) -e '.[dev,stack]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/tinyseek run --preset $(PRESET)

test: $(STAMP)
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist worksteal

# the docker-compose topology run natively (PostgreSQL from Debian's packages)
stack-test: $(STAMP)
	bash stack/stack_test.sh

clean:
	rm -rf $(VENV) .pytest_cache

# One entry point for people and CI. `make run` and `make test` set up the environment themselves.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.installed
RUN_DIR ?= runs/local

.PHONY: setup run test test-fast lint bench clean

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# CPU torch first, from the local wheel cache: a bare `torch` requirement would pull a CUDA build.
	$(BIN)/python -m pip install --quiet "torch==$(TORCH_VERSION)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	@touch $(STAMP)

setup: $(STAMP) ## create or refresh the virtual environment

run: $(STAMP) ## the main job on the embedded local defaults (for now: the baseline comparison)
	$(BIN)/llm-auction compare --requests 2000 --json $(RUN_DIR)/baselines.json

test: $(STAMP) ## the test suite (slow end-to-end tests included)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP) ## the test suite without the slow end-to-end tests
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

bench: $(STAMP) ## performance tables (measured side by side in one run)
	$(BIN)/python -m benchmarks.run

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache

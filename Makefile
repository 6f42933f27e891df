# The README's two commands: `make train` (2 ranks, FSDP, on CPU) and `make test`. Both set up a fresh machine first.
PYTHON ?= python3
NPROC ?= 2
ARGS ?=
# Where the project is installed and run: the active virtual or conda environment, else the project's own
# .venv made from $(PYTHON) (system Pythons refuse pip installs, PEP 668, and stay untouched).
ENV_DIR := $(if $(VIRTUAL_ENV)$(CONDA_PREFIX),,.venv)
PY := $(if $(ENV_DIR),$(ENV_DIR)/bin/python,$(PYTHON))

.PHONY: setup train test test-slow bench

# Reuses an installed torch 2.11-2.13 (a .venv sees $(PYTHON)'s packages then); otherwise installs exactly
# torch 2.13.0 (the CPU build on a machine without a GPU), so pip never swaps in a newer CUDA build.
setup:
	@sh setup.sh "$(PYTHON)" $(ENV_DIR)

train: setup
	@if [ "$(NPROC)" = "1" ]; then $(PY) -m recipes.pretrain $(ARGS); \
	else OMP_NUM_THREADS=1 $(PY) -m torch.distributed.run --standalone --nproc-per-node $(NPROC) -m recipes.pretrain $(ARGS); fi

test: setup
	$(PY) -m pytest -q -m "not slow"

test-slow: setup
	$(PY) -m pytest -q -m slow

bench: setup
	$(PY) -m benchmarks.flops
	$(PY) -m benchmarks.throughput
	$(PY) -m benchmarks.memory
	$(PY) -m benchmarks.comm
	$(PY) -m benchmarks.overhead
	$(PY) -m benchmarks.pipeline_bubble
	$(PY) -m benchmarks.checkpoint
	$(PY) -m benchmarks.hierarchical
	$(PY) -m benchmarks.context_parallel
	$(PY) -m benchmarks.moe
	$(PY) -m benchmarks.health
	$(PY) -m benchmarks.planner

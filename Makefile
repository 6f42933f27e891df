# The README's two commands: `make train` (2 ranks, FSDP, on CPU) and `make test`. Both set up a fresh machine first.
PYTHON ?= python3
NPROC ?= 2
ARGS ?=

.PHONY: setup train test test-slow bench

# Reuses an installed torch; otherwise installs torch 2.13.0 (the CPU build on a machine without a
# GPU). The project's own range for torch admits 2.13, so pip never swaps in a CUDA build.
setup:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q "torch==2.13.0"
	$(PYTHON) -m pip install -q -e ".[dev]"

train: setup
	@if [ "$(NPROC)" = "1" ]; then $(PYTHON) -m recipes.pretrain $(ARGS); \
	else OMP_NUM_THREADS=1 $(PYTHON) -m torch.distributed.run --standalone --nproc-per-node $(NPROC) -m recipes.pretrain $(ARGS); fi

test: setup
	$(PYTHON) -m pytest -q -m "not slow"

test-slow: setup
	$(PYTHON) -m pytest -q -m slow

bench: setup
	$(PYTHON) -m benchmarks.flops
	$(PYTHON) -m benchmarks.throughput
	$(PYTHON) -m benchmarks.memory
	$(PYTHON) -m benchmarks.comm
	$(PYTHON) -m benchmarks.overhead
	$(PYTHON) -m benchmarks.pipeline_bubble
	$(PYTHON) -m benchmarks.checkpoint
	$(PYTHON) -m benchmarks.hierarchical

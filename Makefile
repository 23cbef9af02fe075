# Two commands: `make test` (the test suite) and `make bench` (the benchmark).
# Each installs what is missing first and never replaces an installed torch or triton.
PYTHON ?= python3
export PYTHONPATH := $(CURDIR)$(if $(PYTHONPATH),:$(PYTHONPATH))
# Without a GPU, Triton kernels run on the CPU through its interpreter.
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
ifneq ($(HAS_GPU),1)
export TRITON_INTERPRET ?= 1
endif

.PHONY: test bench setup setup-test setup-bench

setup:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q torch==2.13.0
	@[ "$$(uname -s)" != Linux ] || $(PYTHON) -c "import triton" 2>/dev/null || $(PYTHON) -m pip install -q triton

setup-test: setup
	@$(PYTHON) -c "import pytest, hypothesis" 2>/dev/null || $(PYTHON) -m pip install -q pytest hypothesis

setup-bench: setup
	@$(PYTHON) -c "import matplotlib" 2>/dev/null || $(PYTHON) -m pip install -q matplotlib || true

test: setup-test
	$(PYTHON) -m pytest -q tests $(PYTEST_ARGS)

bench: setup-bench
	$(PYTHON) -m msattn.bench.cli bench $(BENCH_ARGS)

# Two commands: `make test` (the test suite) and `make bench` (the benchmark).
# Each installs what is missing first and never replaces an installed torch or triton.
# Order matters: torch goes in first, pinned (torch==2.13.0), and only when none imports, so that
# no later package can pull an unpinned torch (and its CUDA wheels) in as a dependency.
PYTHON ?= python3
PIP := $(PYTHON) -m pip install -q
export PYTHONPATH := $(CURDIR)$(if $(PYTHONPATH),:$(PYTHONPATH))
# Without a GPU, Triton kernels run on the CPU through its interpreter.
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
ifneq ($(HAS_GPU),1)
export TRITON_INTERPRET ?= 1
endif
# Installs after torch carry this requirement ("torch==<installed version>"): it is already met, so
# pip leaves torch alone, and a package that wanted another torch would fail instead of
# downloading one. Empty when pip has no record of the installed torch.
KEEP_TORCH = $$($(PYTHON) -c "import importlib.metadata as m; print('torch==' + m.version('torch'))" 2>/dev/null)

.PHONY: test bench setup setup-test setup-bench

setup:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) torch==2.13.0
	@[ "$$(uname -s)" != Linux ] || $(PYTHON) -c "import triton" 2>/dev/null || $(PIP) triton $(KEEP_TORCH)
	@# numpy: Triton's CPU interpreter (TRITON_INTERPRET=1) and the tests need it; torch does not bring it.
	@$(PYTHON) -c "import numpy" 2>/dev/null || $(PIP) numpy $(KEEP_TORCH)

setup-test: setup
	@$(PYTHON) -c "import pytest, hypothesis" 2>/dev/null || $(PIP) pytest hypothesis $(KEEP_TORCH)
	@# transformers: for the tests of the transformers integration (they skip without it).
	@$(PYTHON) -c "import transformers" 2>/dev/null || $(PIP) "transformers>=5.17" $(KEEP_TORCH)

setup-bench: setup
	@$(PYTHON) -c "import matplotlib" 2>/dev/null || $(PIP) matplotlib $(KEEP_TORCH) || true

test: setup-test
	@# No path in PYTEST_ARGS: pytest runs testpaths (tests/) from pyproject.toml.
	$(PYTHON) -m pytest -q $(PYTEST_ARGS)

bench: setup-bench
	$(PYTHON) -m msattn.bench.cli bench $(BENCH_ARGS)

# Every target runs inside the repo's virtualenv (.venv), created by `make install`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
NPROC ?= 2

.PHONY: install demo test test-gpu test-all bench lint format clean gpu-wheels gpu-check

install: $(BIN)/.installed

$(BIN)/.installed: setup.py pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch==2.13.0 resolves to the CPU build on CPU-only machines and to the CUDA build on GPU nodes.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	# Test data only: dashscope ships qwen.tiktoken, the real Qwen2 BPE ranks the template tests rebuild (never
	# imported; --no-deps skips its heavy server stack).
	$(BIN)/pip install -q --no-deps dashscope==2.0.2
	touch $@

demo: install
	$(BIN)/python -m engine.demo --nproc $(NPROC)

test: install
	$(BIN)/python -m pytest -q -m "not gpu and not slow" tests

test-gpu: install
	$(BIN)/python -m pytest -q -m "gpu" tests

test-all: install
	$(BIN)/python -m pytest -q tests

bench: install
	$(BIN)/python -m benchmarks.bench_long_ce --quick
	$(BIN)/python -m benchmarks.bench_data
	$(BIN)/python -m benchmarks.bench_train --quick

# The prepared GPU check (benchmarks/README.md). gpu-wheels runs where a registry is reachable and fills the
# ignored .whl/ (pip download --no-deps --only-binary=:all: for each GPU_PYTHON); gpu-check runs on the GPU node
# with the node's own python (GPU_PY), never the venv, never a registry.
GPU_PYTHON ?= 3.12 3.11
GPU_ARCH ?= x86_64
GPU_WHEELS_ARGS ?=
GPU_PY ?= python3
GPU_CHECK_ARGS ?=

gpu-wheels:
	$(PY) -m benchmarks.gpu_wheels --python $(GPU_PYTHON) --arch $(GPU_ARCH) $(GPU_WHEELS_ARGS)

gpu-check:
	$(GPU_PY) -m benchmarks.gpu_check $(GPU_CHECK_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache

# Every target runs inside the repo's virtualenv (.venv), created by `make install`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
NPROC ?= 2

# The oldest torch / triton the suite is proven on (setup.py's floor; the GPU images in use ship them).
TORCH_FLOOR := 2.11.0
TRITON_FLOOR := 3.6.0
# Outside the repo, so CI runs on the same machine reuse it (a fresh build takes ~1.5 min and 4.9 GB here).
COMPAT_VENV ?= $(HOME)/.cache/longwriter-engine/venv-torch$(TORCH_FLOOR)
# The fast subset that exercises the version-sensitive APIs: FSDP2, DCP, state_dict, activation checkpointing,
# the attention kernels' signatures, the training loop with resume and export, the models vs transformers.
COMPAT_TESTS := tests/models/test_attn_backends.py tests/models/test_models_parity.py \
	tests/kernels/test_long_ce_ref.py tests/train/test_train_units.py tests/train/test_train_loop.py

.PHONY: install demo test test-gpu test-all test-compat compat-venv bench lint format clean gpu-wheels gpu-check

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

# A second venv with the floor torch / triton (this checkout runs from PYTHONPATH: the venv holds only the
# dependencies, rebuilt when setup.py changes), then the fast subset under it.
compat-venv:
	@h=$$(md5sum setup.py | cut -c1-12); if [ ! -f "$(COMPAT_VENV)/.deps-$$h" ]; then \
		set -e; $(PY) -m venv $(COMPAT_VENV); \
		$(COMPAT_VENV)/bin/pip install -q torch==$(TORCH_FLOOR) triton==$(TRITON_FLOOR); \
		$(COMPAT_VENV)/bin/pip install -q '.[dev]' torch==$(TORCH_FLOOR) triton==$(TRITON_FLOOR); \
		$(COMPAT_VENV)/bin/pip uninstall -q -y longwriter-engine; rm -rf build; \
		rm -f $(COMPAT_VENV)/.deps-*; touch "$(COMPAT_VENV)/.deps-$$h"; fi

test-compat: compat-venv
	$(COMPAT_VENV)/bin/python -c "import torch, triton; print('test-compat: torch', torch.__version__, 'triton', triton.__version__)"
	PYTHONPATH=$(CURDIR) $(COMPAT_VENV)/bin/python -m pytest -q -p no:cacheprovider -m "not gpu and not slow" $(COMPAT_TESTS)

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

# Two entry points, each installing what it needs into .venv on first use:
#   make demo   the main job on its embedded default
#   make test   the test suite (what CI runs)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.ovit-installed
# CI and laptops have no GPU: install pure Python (Triton runs under its interpreter in tests).
BUILD_CUDA ?= 0

.PHONY: demo test lint nvcc-check triton-check clean

$(STAMP): requirements-dev.txt pyproject.toml setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements-dev.txt
	OVIT_BUILD_CUDA=$(BUILD_CUDA) $(BIN)/python -m pip install -q -e . --no-build-isolation --no-deps
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/ovit demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .

# Compile every kernel source with nvcc alone (torch-free), for sm_80 and sm_90.
nvcc-check:
	@for f in csrc/*.cu; do \
	  echo "nvcc $$f"; \
	  nvcc -std=c++17 -O3 -Icsrc -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
	       -Xptxas -warn-spills -c $$f -o /dev/null || exit 1; \
	done

# Compile every Triton launch configuration for sm_80 and sm_90 (no GPU needed): catches what
# the interpreter accepts but the GPU compiler rejects, and reports register spills.
triton-check: $(STAMP)
	$(BIN)/python bench/triton_compile_check.py --quick

clean:
	rm -rf $(VENV) build *.egg-info ovit_kernels/_C*.so

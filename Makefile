# Two entry points, each installing what it needs into .venv on first use:
#   make demo   the main job on its embedded default
#   make test   the test suite (what CI runs)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.ovit-installed
# CI and laptops have no GPU: install pure Python (Triton runs under its interpreter in tests).
BUILD_CUDA ?= 0

.PHONY: demo test lint nvcc-check triton-check bench-cpu-blocks clean

# Include flags for csrc/bindings.cpp: the installed torch, Python, and a CUDA runtime header
# (torch's pip CUDA headers, CUDA_HOME or /usr/local/cuda).
define BINDINGS_FLAGS
import glob, os, sysconfig
from torch.utils.cpp_extension import include_paths
paths = sysconfig.get_paths()
dirs = [*include_paths(), paths["include"], *sorted(glob.glob(os.path.join(paths["purelib"], "nvidia", "*", "include")))]
dirs += [os.path.join(h, "include") for h in (os.environ.get("CUDA_HOME"), "/usr/local/cuda") if h]
print(" ".join("-I" + d for d in dirs if os.path.isdir(d)))
endef
export BINDINGS_FLAGS

$(STAMP): requirements-dev.txt pyproject.toml setup.py $(wildcard csrc/cpu/*)
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

# Compile every kernel source with nvcc alone (torch-free), for sm_80 and sm_90, and check that
# the one torch-facing file (the pybind11 bindings) compiles against the installed torch.
nvcc-check: $(STAMP)
	@for f in csrc/*.cu; do \
	  echo "nvcc $$f"; \
	  nvcc -std=c++17 -O3 -Icsrc -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
	       -Xptxas -warn-spills -c $$f -o /dev/null || exit 1; \
	done
	@echo "c++ -fsyntax-only csrc/bindings.cpp"
	@$(BIN)/python -c "$$BINDINGS_FLAGS" 2>/dev/null > .bindings-flags
	@$${CXX:-g++} -std=c++20 -fsyntax-only $$(cat .bindings-flags) -Icsrc -DTORCH_EXTENSION_NAME=_C csrc/bindings.cpp; \
	  rc=$$?; rm -f .bindings-flags; exit $$rc

# Compile every Triton launch configuration for sm_80 and sm_90 (no GPU needed): catches what
# the interpreter accepts but the GPU compiler rejects, and reports register spills.
triton-check: $(STAMP)
	$(BIN)/python bench/triton_compile_check.py --quick

# Per-block cost of the CPU kernels, one thread, torch-free (bench/cpu_blocks.cpp).
bench-cpu-blocks:
	@mkdir -p build
	$${CXX:-g++} -O3 -std=c++17 -pthread -march=$${OVIT_CPU_ARCH:-native} -Icsrc/cpu bench/cpu_blocks.cpp \
	  csrc/cpu/kernels.cpp -o build/cpu_blocks
	build/cpu_blocks

clean:
	rm -rf $(VENV) build *.egg-info ovit_kernels/_C*.so

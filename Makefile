# Quick start (see README.md):
#   make bench   set up .venv, build the CUDA extension where possible, run the benchmarks
#   make test    set up .venv, build, run the tests and build the C++ library
#   make demo    set up .venv, train a tiny ENAT on a CPU in minutes and score its samples
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.14.1
BUILD_INPUTS := setup.py pyproject.toml $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.cuh' -o -name '*.h')
CMAKE_BUILD := build/cmake
# pytest-benchmark's own timing is the eager latency (a few rounds suffice); GPU time comes from do_bench.
# -rs lists why each skipped case was skipped (a provider the machine cannot run).
BENCH_FLAGS ?= -rs --benchmark-columns=median,iqr,rounds --benchmark-max-time=0.1 --benchmark-autosave

.PHONY: setup test bench demo cpp gpu-check clean

$(VENV)/.ready: $(BUILD_INPUTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH)" numpy tqdm Pillow pytest pytest-benchmark ninja einops setuptools wheel \
		pytorch-fid scipy
	$(PY) -m pip install -q --no-build-isolation -e .
	$(PY) -c "import enat_kernels as e; print('enat_kernels: CUDA extension', 'built' if e.EXTENSION_LOADED else 'not available: ' + e.EXTENSION_ERROR); print('enat_kernels: CPU kernels', 'built' if e.CPU_KERNELS_LOADED else 'not available: ' + e.CPU_KERNELS_ERROR)"
	touch $@

setup: $(VENV)/.ready

# The last step checks every op on every backend that runs here against float64 PyTorch (README,
# "Checking an installation"); TRITON_INTERPRET=1 runs the Triton kernels in the interpreter on a CPU.
test: setup cpp
	$(PY) -m pytest tests/ -ra
	$(PY) -m pytest benchmarks/ --benchmark-disable -q
	TRITON_INTERPRET=1 $(PY) -m enat_kernels --check

bench: setup
	$(PY) -m pytest benchmarks/ --benchmark-only $(BENCH_FLAGS)

# Trains a tiny ENAT on the package's own pattern grids on a CPU (about ten minutes on two cores),
# samples with and without reuse, prints the checker's scores and writes docs/demo.png (README, "The demo").
demo: setup
	$(PY) -m enat.demo

# The C++ library for libtorch programs, and the example that loads it; skipped, with the reason,
# without CMake, nvcc or a CUDA build of torch (the Python package does not need them).
cpp: setup
	@cuda_home=$${CUDA_HOME:-/usr/local/cuda}; \
	if ! command -v cmake >/dev/null; then echo "cpp: skipped (cmake is not installed)"; \
	elif [ ! -x "$$cuda_home/bin/nvcc" ]; then echo "cpp: skipped (no CUDA toolkit at $$cuda_home; set CUDA_HOME)"; \
	elif ! $(PY) -c 'import sys, torch; sys.exit(torch.version.cuda is None)'; then \
		echo "cpp: skipped (torch is a CPU-only build)"; \
	else \
		set -ex; \
		CUDA_HOME=$$cuda_home cmake -S . -B $(CMAKE_BUILD) -G Ninja \
			-DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch; print(torch.utils.cmake_prefix_path)')"; \
		cmake --build $(CMAKE_BUILD); \
		$(CMAKE_BUILD)/enat_ops_example; \
	fi

# On a machine with a GPU and torch, triton, pytest, pytest-benchmark and ninja installed.
gpu-check:
	bash scripts/gpu_check.sh

clean:
	rm -rf build $(VENV) enat_kernels/_C*.so *.egg-info .benchmarks

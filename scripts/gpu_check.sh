#!/usr/bin/env bash
# GPU check: build the CUDA extension, run every test (the GPU ones included), run the benchmarks,
# and print a short summary table last. Meant for a machine with one NVIDIA GPU and torch, triton,
# pytest, pytest-benchmark and ninja already installed; takes a few minutes.
#
#   bash scripts/gpu_check.sh            # results go to $OUT (or ./gpu-check) as JSON and text
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${OUT:-gpu-check}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python}
status=0
step() { echo; echo "== $* [$(date +%T)]"; }

step "environment"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
$PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name())"

step "build (TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:=9.0})"
export TORCH_CUDA_ARCH_LIST MAX_JOBS=${MAX_JOBS:-16}
ENAT_KERNELS_BUILD_CUDA=1 $PY -m pip install --no-build-isolation --no-deps -q -e . 2>&1 | tail -20 || status=1
$PY -c "import enat_kernels as e; assert e.EXTENSION_LOADED, e.EXTENSION_ERROR; print('CUDA extension loaded')" || status=1

step "tests"
# One Triton config per kernel in the tests (fewer compiles); the benchmarks autotune.
ENAT_KERNELS_AUTOTUNE=0 $PY -m pytest tests/ -q -rs --junitxml="$OUT_DIR/tests.xml" 2>&1 | tee "$OUT_DIR/tests.txt" | tail -40
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

step "benchmarks: ops"
$PY -m pytest benchmarks/ --benchmark-only -q --benchmark-min-rounds=5 --benchmark-max-time=0.2 -k "not bench_sample" \
    --benchmark-columns=median,rounds --benchmark-json="$OUT_DIR/bench.json" > "$OUT_DIR/bench.txt" 2>&1 || status=1
tail -5 "$OUT_DIR/bench.txt"

# Generation at 256 px here (batch 32 and 128, every provider); `make bench` adds 512 px.
step "benchmarks: generation (256 px)"
$PY -m pytest benchmarks/bench_model.py --benchmark-only -q -k "256" \
    --benchmark-columns=median,rounds --benchmark-json="$OUT_DIR/bench_model.json" > "$OUT_DIR/bench_model.txt" 2>&1 || status=1
tail -5 "$OUT_DIR/bench_model.txt"

step "summary"
$PY benchmarks/summarize.py "$OUT_DIR/bench.json" | tee "$OUT_DIR/summary.txt"
$PY benchmarks/summarize.py "$OUT_DIR/bench_model.json" | tee -a "$OUT_DIR/summary.txt"
echo "status: $([ $status -eq 0 ] && echo OK || echo FAILED)"
exit $status

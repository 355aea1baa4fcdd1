#!/usr/bin/env bash
# GPU check: build the CUDA extension, run `python -m enat_kernels --check` and `--bench`, run every
# test (the GPU ones included), run the op benchmarks
# (asymmetric_attention at every shape of an 8-step ENAT-L generation at 256 and 512 px and at training
# shapes, token movement at the trajectory's row counts: GPU time by triton.testing.do_bench, and eager
# latency), the generation and training-step benchmarks, profile one generation run, and print a short
# summary table last (benchmarks/summarize.py: each op against its baselines and the contract's targets,
# ok or MISS per shape, and the worst shape per target). Meant for a machine with one NVIDIA GPU and
# torch, triton, pytest, pytest-benchmark and ninja installed (pytest-xdist is used when present). Each
# stage has a time cap, and the build and tests stop early enough to leave the op benchmarks their time,
# so that the whole run ends within GPU_CHECK_SECONDS (default 540); a stage cut short is reported as
# such.
#
#   bash scripts/gpu_check.sh            # results go to $OUT (or ./gpu-check) as JSON and text
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${OUT:-gpu-check}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python}
END=$((SECONDS + ${GPU_CHECK_SECONDS:-540}))
status=0
step() { echo; echo "== $* [$(date +%T)]"; }
# capped SECONDS RESERVE CMD...: run CMD for at most SECONDS, and stop it RESERVE seconds before the overall
# end (the time later stages are promised); SIGINT first, so that pytest still writes its reports.
capped() {
    local cap=$1 reserve=$2; shift 2
    local left=$((END - reserve - SECONDS)); [ "$left" -lt "$cap" ] && cap=$left
    if [ "$cap" -le 5 ]; then echo "skipped: out of time"; return 1; fi
    timeout -s INT -k 15 "$cap" "$@"
    local rc=$?; [ $rc -eq 124 ] && echo "cut short after ${cap}s"
    return $rc
}
OPS_SECONDS=200  # the op benchmarks' share: build and tests leave it (and the summary's 15 s) free

step "environment"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv,noheader || true
$PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name())"
echo "C++ compiler: ${CXX:-c++} ($(command -v "${CXX:-c++}")), $("${CXX:-c++}" --version | head -1)"
NVCC=$(command -v nvcc || echo "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc")
echo "CUDA compiler: $NVCC, $("$NVCC" --version 2>/dev/null | grep -i release || echo 'not found')"

step "build (TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:=9.0})"
export TORCH_CUDA_ARCH_LIST MAX_JOBS=${MAX_JOBS:-16}
ENAT_KERNELS_BUILD_CUDA=1 capped 200 $((OPS_SECONDS + 15)) $PY -m pip install --no-build-isolation --no-deps -v -e . > "$OUT_DIR/build.txt" 2>&1 || status=1
tail -5 "$OUT_DIR/build.txt"
$PY -c "import enat_kernels as e; assert e.EXTENSION_LOADED, e.EXTENSION_ERROR; print('CUDA extension loaded')" || status=1
# Which compiler built _C.so and which libstdc++ it runs against (a mismatch is what hidden visibility
# and the iostream-free error path guard against).
SO=$($PY -c "import glob, enat_kernels, os; print(glob.glob(os.path.join(os.path.dirname(enat_kernels.__file__), '_C*.so'))[0])" 2>/dev/null)
if [ -n "$SO" ]; then
    echo "_C.so built by: $(readelf -p .comment "$SO" 2>/dev/null | grep -o 'GCC: .*\|clang version .*' | sort -u | tr '\n' ';')"
    echo "_C.so links: $(ldd "$SO" | grep -E 'libstdc\+\+|libc10\.so' | tr -s ' \t' ' ' | tr '\n' ';')"
    echo "_C.so exports: $(nm -D --defined-only "$SO" | awk '{print $3}' | grep -vc '^$') symbols"
fi

# The installation's own check first (every op on every backend, fwd and bwd, fp32/bf16/fp16, against
# float64 PyTorch within the tests' budgets), then its op timings at ENAT-L generation shapes beside the
# PyTorch calls they replace. One Triton config per kernel in the check, as in the tests.
step "check: python -m enat_kernels --check, then --bench"
ENAT_KERNELS_AUTOTUNE=0 capped 150 $((OPS_SECONDS + 15)) $PY -m enat_kernels --check > "$OUT_DIR/check.txt" 2>&1 || status=1
grep -E "FAIL|^Not checked|^  |passes within" "$OUT_DIR/check.txt" | tail -25
capped 120 $((OPS_SECONDS + 15)) $PY -m enat_kernels --bench > "$OUT_DIR/info_bench.txt" 2>&1 || status=1
cat "$OUT_DIR/info_bench.txt"

step "tests"
# One Triton config per kernel in the tests (fewer compiles); the benchmarks autotune.
XDIST=$($PY -c "import xdist" 2>/dev/null && echo "-n 16")
# The ahead-of-time compile checks (test_gpu_targets*.py) need no GPU and run in CI: left out here.
ENAT_KERNELS_AUTOTUNE=0 capped 240 $((OPS_SECONDS + 15)) $PY -m pytest tests/ -q -rfEs $XDIST -p no:cacheprovider \
    --ignore=tests/test_gpu_targets.py --ignore=tests/test_gpu_targets_cuda.py \
    --junitxml="$OUT_DIR/tests.xml" > "$OUT_DIR/tests.txt" 2>&1 || status=1
grep -E "^(FAILED|ERROR)" "$OUT_DIR/tests.txt" | head -30
tail -3 "$OUT_DIR/tests.txt"

# Op benchmarks (the cases not marked `extended`; `make bench` runs all): asymmetric_attention at
# every generation shape in fp16 and the training shapes in fp16 and bf16, the tiny host-path shapes,
# token movement at the mid-trajectory row count, the adaLN ops at generation and training shapes.
# Each case: do_bench GPU time, then a few eager calls.
step "benchmarks: ops (attention trajectory and training shapes, token movement, adaLN)"
capped $OPS_SECONDS 15 $PY -m pytest benchmarks/bench_attention.py benchmarks/bench_tokens.py benchmarks/bench_adaln.py \
    --benchmark-only -q \
    -m "not extended" --benchmark-min-rounds=3 --benchmark-max-time=0.05 -p no:cacheprovider -rs \
    --benchmark-columns=median,rounds --benchmark-json="$OUT_DIR/bench.json" > "$OUT_DIR/bench.txt" 2>&1 || status=1
grep -E "^(FAILED|ERROR)" "$OUT_DIR/bench.txt" | head -10
grep -E "passed|failed" "$OUT_DIR/bench.txt" | tail -1

# Generation: ENAT-S/B/L at 256 px (batch 32 and 128) and ENAT-L at 512 px (batch 16), engine, plain-PyTorch
# baseline (eager and graph) and paper-style; the bf16 matmul ceiling; bf16 token agreement.
step "benchmarks: generation"
capped 200 75 $PY -m pytest benchmarks/bench_model.py --benchmark-only -q -m "not extended" -p no:cacheprovider \
    --benchmark-columns=median,rounds --benchmark-json="$OUT_DIR/bench_model.json" > "$OUT_DIR/bench_model.txt" 2>&1 || status=1
tail -3 "$OUT_DIR/bench_model.txt"

# Training steps: ENAT-B and ENAT-L at 256 px, bf16 autocast, batch 128, plain and reuse steps; this
# package's kernels against paper-style and plain PyTorch (images/s, peak memory).
step "benchmarks: training steps"
capped 120 15 $PY -m pytest benchmarks/bench_train.py --benchmark-only -q -m "not extended" -p no:cacheprovider \
    --benchmark-columns=median,rounds --benchmark-json="$OUT_DIR/bench_train.json" > "$OUT_DIR/bench_train.txt" 2>&1 || status=1
tail -3 "$OUT_DIR/bench_train.txt"

step "profile: ENAT-L 256 px, batch 128"
{ capped 40 10 $PY benchmarks/profile_sample.py ENAT-L --batch-size 128 --top 12
  capped 30 10 $PY benchmarks/profile_sample.py ENAT-L --batch-size 128 --provider torch --top 8; } > "$OUT_DIR/profile.txt" 2>&1 || status=1
grep "images/s\|device busy" "$OUT_DIR/profile.txt"

# Evaluation: 5,000 samples of ENAT-L at 256 px (random weights, bf16, batch 125, channels_last) through
# pytorch-fid's Inception with streamed statistics, fp32 (TF32) and bf16 Inception; the split per stage
# checks the target (Inception + statistics <= 15% of generate + decode). Needs pytorch-fid (torchvision).
step "evaluation: ENAT-L 256 px, 5000 samples, batch 125"
if $PY -c "import pytorch_fid.inception" 2>/dev/null; then
    for idt in fp32 bf16; do
        capped 75 10 $PY -m enat.evaluate --random-weights --model ENAT-L --resolution 256 --num-samples 5000 \
            --batch-size 125 --dtype bf16 --inception-dtype $idt --warmup --no-progress \
            --state-dir "$OUT_DIR/eval_state_$idt" --json "$OUT_DIR/eval_$idt.json" > "$OUT_DIR/eval_$idt.txt" 2>&1 || status=1
        echo "Inception $idt:"; grep -E "images/s|error" "$OUT_DIR/eval_$idt.txt"
        [ -s "$OUT_DIR/eval_$idt.json" ] && $PY -c "import json, sys; d = json.load(open(sys.argv[1])); \
print(f'  Inception + statistics add {100 * d[\"inception_share\"]:.1f}% to generate + decode (target 15%)')" "$OUT_DIR/eval_$idt.json"
    done
else
    echo "skipped: pytorch-fid (with torchvision) is not installed (pip install -e .[eval])"
fi

step "summary"
results=$(for f in "$OUT_DIR/bench_model.json" "$OUT_DIR/bench_train.json" "$OUT_DIR/bench.json"; do [ -s "$f" ] && echo "$f"; done)
[ -n "$results" ] && $PY benchmarks/summarize.py $results 2>&1 | tee "$OUT_DIR/summary.txt"
echo "status: $([ $status -eq 0 ] && echo OK || echo FAILED)"
exit $status

"""Shared benchmark plumbing: two timings per case, device and versions, derived throughput.

Every case is timed twice, and the two are kept apart:

- GPU time (`gpu_s`, the median; `gpu_p20_s`, `gpu_p80_s`): what the kernels cost on the device.
  triton.testing.do_bench: CUDA events around each of many back-to-back calls, the L2 cache flushed
  before every call, after a warm-up. ENAT_BENCH_GPU_TIMER=cudagraph uses do_bench_cudagraph instead
  (the calls captured in one CUDA graph and replayed: no host time at all, but no L2 flush).
  TFLOP/s and GB/s are derived from this time.
- Eager latency (`eager_s`): pytest-benchmark's own timing of one call followed by a device
  synchronisation, so host overhead (argument checks, dispatch, launches) and GPU time add up, as a
  caller who waits for the result sees them. On a CPU this wall-clock time is the only time, and the
  throughput figures are derived from it.

Inputs are made by the caller outside the timed function. Each result's extra_info holds what a later
run needs to compare against it: op, provider, mode, shape, dtype, layout, role, the work done (FLOPs
or bytes), both timings, the derived TFLOP/s or GB/s, the baselines, the device and library versions.
conftest.py prints the table of these at the end of the run; summarize.py reads them back from the
pytest-benchmark JSON.

Environment: ENAT_BENCH_GPU_TIMER (do_bench | cudagraph), ENAT_BENCH_WARMUP_MS (default 5) and
ENAT_BENCH_REP_MS (default 25) for the GPU timing of one case.
"""

import functools
import os
import platform
import statistics

import pytest
import torch

import enat_kernels
from enat_kernels import BackendUnavailableError, triton_utils

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_GPU = DEVICE == "cuda"
GPU_TIMER = os.environ.get("ENAT_BENCH_GPU_TIMER", "do_bench")
if GPU_TIMER not in ("do_bench", "cudagraph"):
    raise ValueError(f"ENAT_BENCH_GPU_TIMER must be do_bench or cudagraph, got {GPU_TIMER!r}")
WARMUP_MS = float(os.environ.get("ENAT_BENCH_WARMUP_MS", "5"))
REP_MS = float(os.environ.get("ENAT_BENCH_REP_MS", "25"))

# Cases marked `extended` run in `make bench` and are left out of the GPU check (pytest -m "not extended").
extended = pytest.mark.extended


def dtype_name(dtype):
    return str(dtype).removeprefix("torch.")


@functools.cache
def environment():
    """Device, versions and timing method, stored with every result."""
    if ON_GPU:
        device = torch.cuda.get_device_name()
        cuda = torch.version.cuda
        cudnn = torch.backends.cudnn.version()
        timer = ("triton.testing.do_bench_cudagraph (graph replay, no host time)" if GPU_TIMER == "cudagraph"
                 else "triton.testing.do_bench (CUDA events per call, L2 flushed)")
    else:
        device = f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
        cuda = cudnn = None
        timer = "wall clock (CPU: no GPU time)"
    return {
        "device": device,
        "torch": torch.__version__,
        "cuda": cuda,
        "cudnn": cudnn,
        "triton": None if triton_utils.triton is None else triton_utils.triton.__version__,
        "python": platform.python_version(),
        "enat_kernels": enat_kernels.__version__,
        "cuda_extension": enat_kernels.EXTENSION_LOADED,
        "cpu_kernels": enat_kernels.CPU_KERNELS_LOADED,
        "gpu_timer": timer,
    }


def prepare(fn):
    """Run fn once (compiling or autotuning kernels, and showing that the provider can serve);
    skip the benchmark with the dispatcher's reasons when it cannot."""
    try:
        fn()
    except BackendUnavailableError as e:
        pytest.skip(str(e).replace("\n", " "))
    if ON_GPU:
        torch.cuda.synchronize()
    return fn


def _event_timing(fn):
    """do_bench's method without Triton: CUDA events around each call, L2 flushed before each."""
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device=DEVICE)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        flush.zero_()
        fn()
    end.record()
    torch.cuda.synchronize()
    estimate = max(start.elapsed_time(end) / 5, 1e-3)
    for _ in range(max(1, int(WARMUP_MS / estimate))):
        fn()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(max(1, int(REP_MS / estimate)))]
    for s, e in events:
        flush.zero_()
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    times = sorted(s.elapsed_time(e) for s, e in events)
    return [statistics.median(times), times[int(0.2 * (len(times) - 1))], times[int(0.8 * (len(times) - 1))]]


def gpu_time(fn):
    """{gpu_s, gpu_p20_s, gpu_p80_s}: the GPU time of one call of fn, in seconds."""
    quantiles = [0.5, 0.2, 0.8]
    if triton_utils.triton is None:
        ms = _event_timing(fn)
    else:
        from triton import testing

        if GPU_TIMER == "cudagraph":
            ms = testing.do_bench_cudagraph(fn, rep=REP_MS, quantiles=quantiles)
        else:
            ms = testing.do_bench(fn, warmup=WARMUP_MS, rep=REP_MS, quantiles=quantiles)
    return {"gpu_s": ms[0] * 1e-3, "gpu_p20_s": ms[1] * 1e-3, "gpu_p80_s": ms[2] * 1e-3}


def measure(benchmark, fn, *, op, provider, mode, shape, dtype, flops=None, bytes_moved=None, images=None,
            baselines=(), rounds=None, layout=None, role=None, gpu=None):
    """Benchmark fn and record the result; `baselines` name the providers to compare with in the table.

    gpu: whether to measure GPU time (on a GPU; by default for every case but whole-generation ones,
    `images` given, whose calls take seconds and include host work by design). `rounds` fixes the number
    of timed eager rounds (after one warm-up call) for calls that take seconds."""
    dtype = dtype_name(dtype)
    benchmark.group = " ".join(str(p) for p in (op, mode, shape, dtype, layout) if p)
    benchmark.extra_info.update(
        environment(), op=op, provider=provider, mode=mode, shape=shape, dtype=dtype, layout=layout, role=role,
        flops=flops, bytes=bytes_moved, baselines=list(baselines),
    )
    if benchmark.disabled:  # --benchmark-disable: one call, nothing timed
        benchmark(lambda: prepare(fn))
        return
    prepare(fn)
    info = benchmark.extra_info
    if ON_GPU and (gpu if gpu is not None else images is None):
        info.update(gpu_time(fn))

    if ON_GPU:
        def call():
            fn()
            torch.cuda.synchronize()
    else:
        call = fn
    if rounds is None:
        benchmark(call)
    else:
        benchmark.pedantic(call, rounds=rounds, iterations=1)
    eager = benchmark.stats.stats.median
    info["eager_s"] = info["median_s"] = eager
    seconds = info.get("gpu_s", eager)  # what the throughput figures are derived from
    info["time_s"] = seconds
    if images is not None:
        info["images/s"] = images / eager
    if flops is not None:
        info["TFLOP/s"] = flops / seconds / 1e12
    if bytes_moved is not None:
        info["GB/s"] = bytes_moved / seconds / 1e9

"""Shared benchmark plumbing: device, providers that may be unavailable, derived throughput.

Each benchmark records in extra_info what a later run needs to compare against it: op, provider,
mode, shape, dtype, the work done (FLOPs or bytes moved), the derived TFLOP/s or GB/s, and the
device and library versions. conftest.py prints the table of these at the end of the run.
"""

import platform
import time

import pytest
import torch

import enat_kernels
from enat_kernels import BackendUnavailableError, triton_utils

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_GPU = DEVICE == "cuda"


def environment():
    """Device and versions, stored with every result."""
    if ON_GPU:
        device = torch.cuda.get_device_name()
        cuda = torch.version.cuda
    else:
        device = f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
        cuda = None
    return {
        "device": device,
        "torch": torch.__version__,
        "cuda": cuda,
        "triton": None if triton_utils.triton is None else triton_utils.triton.__version__,
        "enat_kernels": enat_kernels.__version__,
        "cuda_extension": enat_kernels.EXTENSION_LOADED,
    }


def synchronized_timer():
    """perf_counter after the GPU has finished the queued work: a round of N calls is timed from
    the first launch to the end of the last kernel, with one sync at each end."""
    torch.cuda.synchronize()
    return time.perf_counter()


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


def measure(benchmark, fn, *, op, provider, mode, shape, dtype, flops=None, bytes_moved=None, images=None,
            baselines=(), rounds=None):
    """Benchmark fn and record the result; `baselines` name the providers to compare with in the table.
    `rounds` fixes the number of timed rounds (after one warm-up call) for calls that take seconds."""
    benchmark.group = f"{op} {mode} {shape} {str(dtype).removeprefix('torch.')}"
    benchmark.extra_info.update(
        environment(), op=op, provider=provider, mode=mode, shape=shape,
        dtype=str(dtype).removeprefix("torch."), flops=flops, bytes=bytes_moved, baselines=list(baselines),
    )
    if benchmark.disabled:  # --benchmark-disable: one call, nothing timed
        benchmark(lambda: prepare(fn))
        return
    prepare(fn)
    if rounds is None:
        benchmark(fn)
    else:
        benchmark.pedantic(fn, rounds=rounds, iterations=1)
    median = benchmark.stats.stats.median
    benchmark.extra_info["median_s"] = median
    if images is not None:
        benchmark.extra_info["images/s"] = images / median
    if flops is not None:
        benchmark.extra_info["TFLOP/s"] = flops / median / 1e12
    if bytes_moved is not None:
        benchmark.extra_info["GB/s"] = bytes_moved / median / 1e9

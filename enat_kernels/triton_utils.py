"""Triton plumbing shared by the kernels: optional import, interpreter mode, pinned autotuning.

Triton kernels run on CUDA tensors, or on CPU tensors in the interpreter. Interpreter mode is chosen
by TRITON_INTERPRET=1 *before* triton is imported (tests/conftest.py sets it when there is no GPU),
and is read once here. The interpreter cannot autotune over several configs, so `autotune_configs`
keeps only the first one when interpreting or when ENAT_KERNELS_AUTOTUNE=0.
"""

import os

try:
    import triton
    import triton.language as tl
except ImportError as e:  # CPU-only torch builds do not ship triton
    triton = tl = None
    IMPORT_ERROR = str(e)
else:
    IMPORT_ERROR = None

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
ENV_AUTOTUNE = "ENAT_KERNELS_AUTOTUNE"


def autotune_configs(configs):
    """The configs to autotune over: all of them, or the first one when autotuning is pinned."""
    if INTERPRET or os.environ.get(ENV_AUTOTUNE, "1") == "0":
        return configs[:1]
    return configs


def device_reasons(device, forced):
    """Why Triton cannot run on tensors of `device` (an empty list when it can)."""
    if triton is None:
        return [f"triton is not installed ({IMPORT_ERROR})"]
    if device.type == "cpu":
        if not INTERPRET:
            return ["Triton runs on CPU tensors only in its interpreter: set TRITON_INTERPRET=1 before importing enat_kernels"]
        if not forced:
            return ["on CPU tensors the Triton interpreter serves only when backend='triton' is forced"]
        return []
    if device.type == "cuda":
        if INTERPRET:
            return ["TRITON_INTERPRET=1 runs Triton kernels on CPU tensors, these are on cuda"]
        return []
    return [f"Triton runs on CUDA tensors, these are on {device.type}"]


if triton is not None:

    @triton.jit
    def lower_bound(row_ptr, stride, n, values, steps):
        """For each of `values`, the number of entries of the ascending int64 row (row_ptr, stride, n)
        that are smaller: a branch-free binary search of `steps` = ceil(log2(n + 1)) rounds."""
        lo = tl.zeros(values.shape, tl.int32)
        hi = tl.zeros(values.shape, tl.int32) + n
        for _ in range(steps):
            active = lo < hi
            mid = (lo + hi) // 2
            entry = tl.load(row_ptr + mid.to(tl.int64) * stride, mask=active, other=0)
            right = entry < values
            lo = tl.where(active & right, mid + 1, lo)
            hi = tl.where(active & ~right, mid, hi)
        return lo


def search_steps(n):
    """Rounds of `lower_bound` over n entries."""
    return max(1, int(n).bit_length())

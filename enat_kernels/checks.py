"""Input validation at the boundary of enat_kernels.ops, public for code built on the ops (the enat
model validates its own inputs with it).

Structural checks (type, rank, shape, dtype, device) cost nothing and always run in the public
functions. Checks that read tensor values (index range and order, mask counts) run inside the op
kernels, only where they cost no host sync: always for CPU tensors, and for CUDA tensors when
ENAT_KERNELS_DEBUG=1. Every message names the argument and shows the shapes. Last, the wording of the
kernels' limits (`dtype_reasons`, `strided_rows_reasons`), which the backends list rather than raise.

Public: the names of `__all__`; the ops and the enat model import this module.
"""

import numbers
import os

import torch

__all__ = ["FLOAT_DTYPES", "ENV_DEBUG", "describe", "tensor", "dtype_in", "same_dtype", "same_device", "size_equal",
           "index", "mask", "count", "uniform_row_count", "values_checked", "index_values", "mask_counts", "dtype_reasons", "strided_rows_reasons"]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
ENV_DEBUG = "ENAT_KERNELS_DEBUG"


def describe(t):
    return f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)} on {t.device.type}"


def tensor(name, t, layout):
    """`t` is a tensor whose rank matches `layout`, e.g. "B L D"."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor ({layout}), got {type(t).__name__}")
    dims = layout.split()
    if t.dim() != len(dims):
        raise ValueError(f"{name} must have {len(dims)} dimensions ({', '.join(dims)}), got {describe(t)}")


def dtype_in(name, t, dtypes):
    if t.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{name} must be one of {names}, got {describe(t)}")


def _same(attr, error, **tensors):
    (first, t0), *rest = tensors.items()
    for name, t in rest:
        if getattr(t, attr) != getattr(t0, attr):
            shown = ", ".join(f"{n}: {describe(x)}" for n, x in tensors.items())
            raise error(f"{first} and {name} must have the same {attr}; got {shown}")


def same_dtype(**tensors):
    _same("dtype", TypeError, **tensors)


def same_device(**tensors):
    _same("device", ValueError, **tensors)


def size_equal(name_a, a, dim_a, name_b, b, dim_b):
    if a.shape[dim_a] != b.shape[dim_b]:
        raise ValueError(
            f"{name_a}.shape[{dim_a}] must equal {name_b}.shape[{dim_b}]; got {name_a}: {describe(a)}, {name_b}: {describe(b)}"
        )


def index(name, idx, x_name, x):
    """`idx` is an int64 (B, n) index for the (B, L, ...) tensor `x`."""
    tensor(name, idx, "B n")
    dtype_in(name, idx, (torch.int64,))
    same_device(**{x_name: x, name: idx})
    size_equal(name, idx, 0, x_name, x, 0)


def mask(name, m, x_name=None, x=None):
    """`m` is a bool (B, L) mask, matching the first two dims of `x` when given."""
    tensor(name, m, "B L")
    dtype_in(name, m, (torch.bool,))
    if x is not None:
        same_device(**{x_name: x, name: m})
        size_equal(name, m, 0, x_name, x, 0)
        size_equal(name, m, 1, x_name, x, 1)


def count(name, n, upper, upper_desc):
    """`n` is an int in [0, upper]."""
    if isinstance(n, bool) or not isinstance(n, (numbers.Integral, torch.SymInt)):
        raise TypeError(f"{name} must be an int, got {type(n).__name__}")
    if isinstance(n, numbers.Integral) and not 0 <= n <= upper:
        raise ValueError(f"{name} must be in [0, {upper}] ({upper_desc}), got {n}")


def uniform_row_count(name, m):
    """The number of True entries per row of `m`, which must be the same in every row (one host sync)."""
    counts = m.sum(dim=1)
    if counts.numel() == 0:
        return 0
    lo, hi = torch.stack(torch.aminmax(counts)).tolist()  # one host sync
    if lo != hi:
        raise ValueError(
            f"every row of {name} must have the same number of True entries; got counts from {lo} to {hi} "
            f"({name}: {describe(m)})"
        )
    return lo


# Value checks, run inside the op kernels.


def values_checked(t):
    """Whether to check the values of `t`: free on CPU, a host sync on a GPU (debug mode only)."""
    return t.device.type == "cpu" or os.environ.get(ENV_DEBUG, "0") == "1"


def _values(t):
    """The values of `t` to check: a NumPy view of a CPU tensor (its small reductions cost less host time
    than torch's), else the tensor itself."""
    return t.numpy() if t.device.type == "cpu" else t


def index_values(name, idx, upper=None):
    """Positions in [0, upper), strictly ascending within each row."""
    if idx.numel() == 0 or not values_checked(idx):
        return
    a = _values(idx)
    ascending = a.shape[1] < 2 or bool((a[:, 1:] > a[:, :-1]).all())
    lo, hi = (int(a[:, 0].min()), int(a[:, -1].max())) if ascending else (int(a.min()), int(a.max()))
    if lo < 0 or (upper is not None and hi >= upper):
        bound = f"[0, {upper})" if upper is not None else "[0, inf)"
        raise ValueError(f"{name} holds positions outside {bound}: min {lo}, max {hi} ({name}: {describe(idx)})")
    if not ascending:
        raise ValueError(f"{name} must hold strictly ascending (so unique) positions in each row ({name}: {describe(idx)})")


def mask_counts(name, m, count_name, n):
    """Every row of `m` has exactly n (given as `count_name`) True entries."""
    if m.numel() == 0 or not values_checked(m):
        return
    counts = _values(m).sum(1)
    if not bool((counts == n).all()):
        lo, hi = int(counts.min()), int(counts.max())
        raise ValueError(
            f"every row of {name} must have {count_name} = {n} True entries; got counts from {lo} to {hi} "
            f"({name}: {describe(m)})"
        )


# A kernel's limits: reasons it cannot take the inputs (a backend's why_not), not errors.


def dtype_reasons(kernels, t, dtypes):
    """[why `kernels` (e.g. "the Triton adaLN kernels") cannot take t's dtype], or [] when it is in `dtypes`."""
    if t.dtype in dtypes:
        return []
    names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
    return [f"{kernels} take {names}, got {str(t.dtype).removeprefix('torch.')}"]


def strided_rows_reasons(**tensors):
    """[why a kernel that reads rows contiguously cannot take it] for each tensor whose last dimension is
    strided."""
    return [f"{name} is not contiguous in its last dimension (strides {t.stride()})"
            for name, t in tensors.items() if t.shape[-1] > 1 and t.stride(-1) != 1]

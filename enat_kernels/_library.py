"""The enat:: operator library.

Each public op is defined once, in Python, by its module in enat_kernels/ops: `define` takes its
schema, its router (the CPU and CUDA kernel, which runs the backend the caller chose) and its fake
kernel; autograd and the backends' implementations sit beside them. The compiled extension
enat_kernels._C (csrc/) adds to the same namespace only the `*_cuda` kernel ops it implements, whose
fake kernels are registered here with `register_cuda_fake`. The CPU kernels (csrc/cpu) are a plain
Python module, enat_kernels._cpu, which the "cpu" backend calls directly (`CPU`, None when absent).
"""

import importlib
import importlib.util

import torch


def _load_extension():
    # A missing module would import as a confusing "partially initialized module" error: look first.
    if importlib.util.find_spec("enat_kernels._C") is None:
        return False, "the CUDA extension enat_kernels._C is not built: pip install -e . on a machine with nvcc (CUDA_HOME)"
    try:
        importlib.import_module("enat_kernels._C")  # registers the enat::*_cuda kernels
    except ImportError as e:
        return False, f"the CUDA extension enat_kernels._C does not load ({e})"
    return True, None


EXTENSION_LOADED, EXTENSION_ERROR = _load_extension()


def _load_cpu_kernels():
    try:
        return importlib.import_module("enat_kernels._cpu"), None
    except ImportError as e:
        return None, f"the CPU kernels enat_kernels._cpu are not built or do not load ({e}): pip install -e . with a C++ compiler"


CPU, CPU_ERROR = _load_cpu_kernels()

LIB = torch.library.Library("enat", "FRAGMENT")


def define(schema, router, fake, lib=LIB):
    """Define the public op enat::<name> (<lib's namespace>::<name>) from its schema (whose last argument
    is `str backend`), with `router` as its CPU and CUDA kernel and `fake` as its fake (shape) kernel.
    Returns the op."""
    name = schema.split("(", 1)[0]
    lib.define(schema)
    lib.impl(name, router, "CPU")
    lib.impl(name, router, "CUDA")
    torch.library.register_fake(f"{lib.ns}::{name}", lib=lib)(fake)
    return getattr(getattr(torch.ops, lib.ns), name)


def register_cuda_fake(name, fake):
    """The fake kernel of the extension's CUDA kernel op enat::<name>, when the extension is loaded."""
    if EXTENSION_LOADED:
        torch.library.register_fake(f"enat::{name}", lib=LIB)(fake)

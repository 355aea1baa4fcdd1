"""Triton, CUDA and C++ CPU kernels for ENAT-style non-autoregressive image generators.

    import enat_kernels.ops as K
    out = K.asymmetric_attention(q, k_ctx, v_ctx, k_self, v_self)

See enat_kernels.ops for the ops and enat_kernels.backends for how a backend is chosen;
enat_kernels.explain(op, *args) tells which one a call would take, and why not the others.
enat_kernels.checks holds the input validation the ops use (public: code built on the ops uses it too).
"""

from . import backends, checks, ops
from ._library import CPU_ERROR as CPU_KERNELS_ERROR
from ._library import EXTENSION_ERROR, EXTENSION_LOADED
from .backends import BackendUnavailableError, Explanation, FallbackWarning, clear_caches, explain

__version__ = "0.1.0"
CPU_KERNELS_LOADED = CPU_KERNELS_ERROR is None  # the cpu backend's C++ kernels (enat_kernels._cpu)


def __getattr__(name):
    """BACKENDS: the registered backends' names, in the order of preference (enat_kernels.backends)."""
    if name == "BACKENDS":
        return backends.BACKENDS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ops", "checks", "backends", "BACKENDS", "BackendUnavailableError", "EXTENSION_LOADED", "EXTENSION_ERROR",
           "CPU_KERNELS_LOADED", "CPU_KERNELS_ERROR", "Explanation", "FallbackWarning", "clear_caches", "explain",
           "__version__"]

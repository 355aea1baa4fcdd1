"""Backend selection for the enat:: ops.

A backend (`Backend`: reference, Triton, CUDA) says what it needs of the device and the build. Each
op has a `Dispatcher` with one implementation per backend it has. For a given call, a backend
answers with the reasons it cannot serve (none means it can): the device, whether the kernel exists
or the extension is built, and op-specific limits such as dtype or head dim. The dispatcher takes
the first backend in its order of preference that can serve. `backend=` on the call, or the
ENAT_KERNELS_BACKEND environment variable, forces one; a forced backend that cannot serve raises
`BackendUnavailableError` listing the reasons.

The choice depends only on devices, dtypes, shapes and strides, never on tensor values, so it is
made once at trace time under torch.compile; eagerly, each kernel's answer is cached per signature
(`signature`), so a call with the shapes and layouts of an earlier one costs a dictionary lookup.
"""

import os
from typing import Callable, NamedTuple, Optional

import torch

from . import _library, triton_utils

class Backend:
    """A kind of kernel. What it needs of the device and the build, whatever the op, is
    `device_reasons`; each op adds its kernel's own limits (`Dispatcher.register`)."""

    name = None

    def device_reasons(self, device, forced):
        """Why this backend cannot run on `device` (an empty list when it can). `forced`: the caller
        asked for this backend by name (Triton then also runs CPU tensors in its interpreter)."""
        return []


class Reference(Backend):
    """Plain PyTorch: every device."""

    name = "reference"


class Triton(Backend):
    """Triton kernels: CUDA GPUs, or CPU tensors under TRITON_INTERPRET=1 (triton_utils)."""

    name = "triton"

    def device_reasons(self, device, forced):
        return triton_utils.device_reasons(device, forced)


class Cuda(Backend):
    """The CUDA kernels of the compiled extension enat_kernels._C: CUDA tensors, extension loaded."""

    name = "cuda"

    def device_reasons(self, device, forced):
        reasons = []
        if device.type != "cuda":
            reasons.append(f"the CUDA backend runs on CUDA tensors, these are on {device.type}")
        if not _library.EXTENSION_LOADED:
            reasons.append(_library.EXTENSION_ERROR)
        return reasons


REGISTRY = {b.name: b for b in (Cuda(), Triton(), Reference())}
BACKENDS = tuple(REGISTRY)  # default order of preference
ENV_BACKEND = "ENAT_KERNELS_BACKEND"


class BackendUnavailableError(RuntimeError):
    """A forced backend cannot serve the call; the message lists why."""


def requested_backend(backend):
    """(backend, where it was asked for) from the argument or the environment; (None, None) for auto."""
    if backend is not None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))} or None, got {backend!r}")
        return backend, f"backend={backend!r}"
    env = os.environ.get(ENV_BACKEND, "").strip()
    if env in ("", "auto"):
        return None, None
    if env not in BACKENDS:
        raise ValueError(f"{ENV_BACKEND} must be one of {', '.join(BACKENDS)}, auto or unset, got {env!r}")
    return env, f"{ENV_BACKEND}={env}"


CACHE_LIMIT = 4096  # cached answers per dispatcher; a full cache starts over


def signature(*args):
    """A hashable summary of what backend choice and input validation depend on: each tensor's type,
    dtype, shape, strides and device, other arguments with their types. None when it cannot be hashed
    (symbolic shapes while torch.compile traces)."""
    key = tuple((torch.Tensor, a.dtype, a.shape, a.stride(), a.device) if isinstance(a, torch.Tensor)
                else (type(a), a) for a in args)
    try:
        hash(key)
    except TypeError:
        return None
    return key


class Impl(NamedTuple):
    run: Callable
    why_not: Optional[Callable]  # (*args) -> list of reasons this backend cannot serve the inputs


class Dispatcher:
    """The implementations of one op, by backend, and the rule that picks one."""

    def __init__(self, op, order=BACKENDS):
        self.op = op
        self.order = order
        self.impls = {}
        self._cache = {}  # (backend, signature) -> the kernel's reasons

    def register(self, backend, run, why_not=None):
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}")
        self.impls[backend] = Impl(run, why_not)

    def reasons(self, backend, device, args, forced=False):
        """Why `backend` cannot serve this op on `args` (an empty list when it can)."""
        impl = self.impls.get(backend)
        if impl is None:
            return [f"enat_kernels has no {backend} kernel for {self.op}"]
        reasons = REGISTRY[backend].device_reasons(device, forced)
        if impl.why_not is not None:
            reasons = reasons + self._kernel_reasons(backend, impl.why_not, args)
        return reasons

    def _kernel_reasons(self, backend, why_not, args):
        """why_not(*args), cached by the arguments' signature (the kernel's own limits)."""
        sig = signature(*args)
        if sig is None:
            return why_not(*args)
        key = (backend, sig)
        reasons = self._cache.get(key)
        if reasons is None:
            if len(self._cache) >= CACHE_LIMIT:
                self._cache.clear()
            reasons = self._cache[key] = why_not(*args)
        return reasons

    def _serves(self, backend, device, args):
        """reasons() == [] without working out every reason: the device comes first."""
        impl = self.impls.get(backend)
        if impl is None or REGISTRY[backend].device_reasons(device, False):
            return False
        return impl.why_not is None or not self._kernel_reasons(backend, impl.why_not, args)

    def select(self, backend, device, *args, preferred=None):
        """The backend to run: the forced one, else `preferred` (the backend of the forward, for a
        backward) if it can serve, else the first in order of preference that can."""
        forced, source = requested_backend(backend)
        if forced is not None:
            reasons = self.reasons(forced, device, args, forced=True)
            if reasons:
                raise BackendUnavailableError(
                    f"{source} cannot serve enat::{self.op} for these inputs:\n  - " + "\n  - ".join(reasons)
                )
            return forced
        if preferred is not None and not self.reasons(preferred, device, args, forced=True):
            return preferred
        for candidate in self.order:
            if self._serves(candidate, device, args):
                return candidate
        lines = [f"{b}: {r}" for b in self.order for r in self.reasons(b, device, args)]
        raise BackendUnavailableError(f"no backend can serve enat::{self.op} for these inputs:\n  - " + "\n  - ".join(lines))

    def run(self, backend, device, *args):
        """Run `backend` (as resolved by `select`, or as given to torch.ops.enat directly)."""
        if backend not in BACKENDS:
            raise ValueError(f"enat::{self.op}: backend must be one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")
        reasons = self.reasons(backend, device, args, forced=True)
        if reasons:
            raise BackendUnavailableError(
                f"backend {backend!r} cannot serve enat::{self.op} for these inputs:\n  - " + "\n  - ".join(reasons)
            )
        return self.impls[backend].run(*args)

"""Backend selection for the enat:: ops, and the path of a public call to its kernel.

A backend (`Backend`: Triton, CUDA, cpu, reference) says what it needs of the device and the build;
`REGISTRY` holds one of each, in the order of preference (`BACKENDS`, `ORDER`), and `add`/`remove`
change it (docs/OPS.md, "Adding a backend"). Each op has a `Dispatcher` (all listed in `DISPATCHERS`)
with one implementation per backend it has. For a given call, a backend answers with the reasons it
cannot serve (none means it can): the device, whether the kernel exists or the extension is built,
and op-specific limits such as dtype or head dim. The dispatcher takes the first backend in the order
of preference that can serve. `backend=` on the call, or
the ENAT_KERNELS_BACKEND environment variable, forces one; a forced backend that cannot serve raises
`BackendUnavailableError` listing the reasons. A CUDA tensor that no kernel serves runs on the
reference and says so once per (op, reasons) with a `FallbackWarning`; `explain(op, *args)` tells,
without running anything, which backend a call would take and why each other one would not.

The choice depends only on devices, dtypes, shapes and strides, never on tensor values, so it is
made once at trace time under torch.compile. Eagerly, a public op (`Entry`) validates its arguments
and chooses once per call signature (`signature`), so a call with the shapes and layouts of an
earlier one costs a dictionary lookup; outside autograd, tracing and dispatch modes it then calls
the chosen kernel directly rather than through torch.ops.enat (whose redispatch costs more host time
than a small kernel's launch). Every such cache is listed in `CACHES`; `clear_caches()` empties them.
"""

import contextvars
import os
import warnings
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


class Cpu(Backend):
    """The C++ CPU kernels of enat_kernels._cpu (csrc/cpu): CPU tensors, module built. Forward kernels
    for the sizes where a CPU call is bound by host time; gradients run on the reference."""

    name = "cpu"

    def device_reasons(self, device, forced):
        reasons = []
        if device.type != "cpu":
            reasons.append(f"the cpu backend runs on CPU tensors, these are on {device.type}")
        if _library.CPU is None:
            reasons.append(_library.CPU_ERROR)
        return reasons


# The order of preference, for every op. Triton comes first: its forward and backward kernels are
# the ones every CPU test run checks against the fp64 oracles (in Triton's interpreter), and they
# compile for sm_80 and sm_90 in CI; the CUDA kernels compile in CI but no GPU run has yet shown them
# correct and faster at the model's shapes (scripts/gpu_check.sh measures both side by side). On CPU
# tensors the C++ kernels come before the reference wherever they take the inputs (their limits say
# where they are faster). The reference serves what no kernel takes.
REGISTRY = {b.name: b for b in (Triton(), Cuda(), Cpu(), Reference())}
ENV_BACKEND = "ENAT_KERNELS_BACKEND"
DISPATCHERS = {}  # op name -> Dispatcher: every op enat_kernels defines, public and backward-only


def __getattr__(name):
    """BACKENDS and ORDER: the names of REGISTRY, in the order of preference, as it stands now."""
    if name in ("BACKENDS", "ORDER"):
        return tuple(REGISTRY)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def add(backend, before="reference"):
    """Register `backend` (a Backend instance with a new name), ahead of `before` in the order of
    preference (None: last). It serves the ops it then registers an implementation for
    (`Dispatcher.register`). Returns the backend."""
    if not isinstance(backend, Backend) or not isinstance(backend.name, str):
        raise TypeError(f"backend must be a Backend instance with a name, got {backend!r}")
    if backend.name in REGISTRY:
        raise ValueError(f"backend {backend.name!r} is already registered")
    names = list(REGISTRY)
    position = len(names) if before is None else names.index(before)
    entries = list(REGISTRY.items())
    entries.insert(position, (backend.name, backend))
    REGISTRY.clear()
    REGISTRY.update(entries)
    clear_caches()
    return backend


def remove(name):
    """Unregister the backend `name` and its implementations of every op."""
    if name not in REGISTRY:
        raise ValueError(f"no backend {name!r} is registered")
    del REGISTRY[name]
    for dispatcher in DISPATCHERS.values():
        dispatcher.impls.pop(name, None)
    clear_caches()


def device_for(name):
    """Where the backend `name` runs in this process: "cuda" where it takes CUDA tensors and there is a
    GPU, else "cpu" where it takes CPU tensors (when forced), else None (it cannot run here)."""
    backend = REGISTRY[name]
    if torch.cuda.is_available() and not backend.device_reasons(torch.device("cuda"), True):
        return "cuda"
    if not backend.device_reasons(torch.device("cpu"), True):
        return "cpu"
    return None


def _names():
    return ", ".join(map(repr, REGISTRY))


class BackendUnavailableError(RuntimeError):
    """A forced backend cannot serve the call; the message lists why."""


class FallbackWarning(UserWarning):
    """A CUDA tensor runs on the reference backend because no kernel serves it (the message says why).
    Issued once per op and reasons; silence it with warnings.filterwarnings("ignore", category=...)."""


def requested_backend(backend):
    """(backend, where it was asked for) from the argument or the environment; (None, None) for auto."""
    if backend is not None:
        if backend not in REGISTRY:
            raise ValueError(f"backend must be one of {_names()} or None, got {backend!r}")
        return backend, f"backend={backend!r}"
    env = os.environ.get(ENV_BACKEND, "").strip()
    if env in ("", "auto"):
        return None, None
    if env not in REGISTRY:
        raise ValueError(f"{ENV_BACKEND} must be one of {', '.join(REGISTRY)}, auto or unset, got {env!r}")
    return env, f"{ENV_BACKEND}={env}"


CACHE_LIMIT = 4096  # entries per cache; a full cache starts over
CACHES = [triton_utils._TUNED]  # every per-signature cache of the package: Triton's chosen configs, and
# those that dispatchers and entries add


def clear_caches():
    """Forget every cached validation, backend choice, kernel limit and autotuned Triton config (they are
    rebuilt on the next call): after changing ENAT_KERNELS_BACKEND's meaning for a running process,
    loading the extension late, or to time a first call again."""
    for cache in CACHES:
        cache.clear()
    _WARNED.clear()


def _cache():
    cache = {}
    CACHES.append(cache)
    return cache


def _get(cache, key):
    """cache[key], None when absent or when the key cannot be hashed (symbolic shapes while
    torch.compile traces: nothing is cached then)."""
    try:
        return cache.get(key)
    except TypeError:
        return None


def _put(cache, key, value):
    try:
        hash(key)
    except TypeError:
        return value
    if len(cache) >= CACHE_LIMIT:
        cache.clear()
    cache[key] = value
    return value


def _state():
    """What a backend choice depends on besides the call: the environment's request and what this
    process can run (the extension, Triton, Triton's interpreter)."""
    return (os.environ.get(ENV_BACKEND), _library.EXTENSION_LOADED, _library.CPU, triton_utils.triton,
            triton_utils.INTERPRET)


def signature(*args):
    """What backend choice and input validation depend on: each tensor's type, dtype, shape, strides
    and device, other arguments with their types (a tuple, unhashable under symbolic shapes)."""
    return tuple([(type(a), a.dtype, a.shape, a.stride(), a.device) if isinstance(a, torch.Tensor)
                  else (type(a), a) for a in args])


class Impl(NamedTuple):
    run: Callable
    why_not: Optional[Callable]  # (*args) -> list of reasons this backend cannot serve the inputs


_WARNED = set()  # (op, reasons) already reported by a FallbackWarning


class Dispatcher:
    """The implementations of one op, by backend, and the rule that picks one. `values(*args)`, when
    given, checks tensor values (index order, mask counts) before any implementation runs."""

    def __init__(self, op, values=None):
        self.op = op
        self.values = values
        self.impls = {}
        self._reasons = _cache()  # (backend, signature) -> the kernel's reasons
        self._choices = _cache()  # (signature, request, preferred) -> the backend chosen
        DISPATCHERS[op] = self

    @property
    def order(self):
        """Every registered backend, in the order of preference."""
        return tuple(REGISTRY)

    def register(self, backend, run, why_not=None):
        """`run(*args)` serves this op on `backend` (a name in REGISTRY); `why_not(*args)`, when given,
        lists why it cannot serve those arguments (its kernel's limits beyond the backend's device)."""
        if backend not in REGISTRY:
            raise ValueError(f"unknown backend {backend!r}: register it first (enat_kernels.backends.add)")
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
        key = (backend, signature(*args))
        reasons = _get(self._reasons, key)
        return reasons if reasons is not None else _put(self._reasons, key, why_not(*args))

    def _serves(self, backend, device, args):
        """reasons() == [] without working out every reason: the device comes first."""
        impl = self.impls.get(backend)
        if impl is None or REGISTRY[backend].device_reasons(device, False):
            return False
        return impl.why_not is None or not self._kernel_reasons(backend, impl.why_not, args)

    def select(self, backend, device, *args, preferred=None):
        """The backend to run: the forced one, else `preferred` (the backend of the forward, for a
        backward) if it can serve, else the first in order of preference that can. Cached per
        signature of the call."""
        key = (signature(*args), backend, preferred, _state())
        chosen = _get(self._choices, key)
        return chosen if chosen is not None else _put(self._choices, key, self._select(backend, device, args, preferred))

    def _select(self, backend, device, args, preferred):
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
                if candidate == "reference" and device.type == "cuda":
                    self._warn_fallback(device, args)
                return candidate
        lines = [f"{b}: {r}" for b in self.order for r in self.reasons(b, device, args)]
        raise BackendUnavailableError(f"no backend can serve enat::{self.op} for these inputs:\n  - " + "\n  - ".join(lines))

    def _warn_fallback(self, device, args):
        reasons = tuple(f"{b}: {r}" for b in self.order if b != "reference" for r in self.reasons(b, device, args))
        if (self.op, reasons) in _WARNED:
            return
        _WARNED.add((self.op, reasons))
        message = (f"enat::{self.op} runs on the reference backend (plain PyTorch) for these CUDA inputs, since no "
                   "kernel serves them:\n  - " + "\n  - ".join(reasons))
        warnings.warn(message, FallbackWarning, stacklevel=7)  # stacklevel: the caller of the public op

    def run(self, backend, device, *args):
        """Run `backend` (as resolved by `select`, or as given to torch.ops.enat directly)."""
        if backend not in REGISTRY:
            raise ValueError(f"enat::{self.op}: backend must be one of {_names()}, got {backend!r}")
        reasons = self.reasons(backend, device, args, forced=True)
        if reasons:
            raise BackendUnavailableError(
                f"backend {backend!r} cannot serve enat::{self.op} for these inputs:\n  - " + "\n  - ".join(reasons)
            )
        if self.values is not None:
            self.values(*args)
        return self.impls[backend].run(*args)


# The public path: validation and choice once per signature, then the registered op or the kernel itself.


class Explanation(NamedTuple):
    """What a call would do: `chosen`, the backend it runs on; `reasons`, for each backend, why it
    cannot serve the call (empty for those that can)."""

    op: str
    chosen: str
    reasons: dict

    def __str__(self):
        lines = [f"enat::{self.op} runs on {self.chosen}"]
        for backend, reasons in self.reasons.items():
            lines.append(f"  {backend}: " + ("can serve" if not reasons else "; ".join(reasons)))
        return "\n".join(lines)


class _Explained(Exception):
    def __init__(self, explanation):
        self.explanation = explanation


_EXPLAINING = contextvars.ContextVar("enat_kernels_explaining", default=False)
_TENSOR = object()  # marks a tensor argument in a plan's normalised arguments
ENTRIES = {}  # op name -> Entry


_is_compiling = torch.compiler.is_compiling
_dispatch_modes = torch._C._len_torch_dispatch_stack
_function_modes = torch._C._is_torch_function_mode_enabled
_functorch = torch._C._are_functorch_transforms_active


class _Plan(NamedTuple):
    chosen: str
    template: Optional[tuple]  # the normalised arguments, _TENSOR where the call's tensor goes; None: as given
    direct: bool  # plain tensors on CPU or CUDA: the implementation may be called directly


class Entry:
    """The public function's path to the registered op (default enat::<dispatcher.op>). `validate(*args)`
    checks the arguments (errors name them) and returns them normalised (the same tensors; defaults and
    numbers resolved); it runs, and the backend is chosen, once per call signature."""

    def __init__(self, dispatcher, validate, op=None):
        self.dispatcher = dispatcher
        self.validate = validate
        self.op = op if op is not None else getattr(torch.ops.enat, dispatcher.op)
        self.values, self.impls = dispatcher.values, dispatcher.impls
        self._plans = _cache()
        ENTRIES[dispatcher.op] = self

    def __call__(self, *args, backend=None):
        key = (signature(*args), backend, _state())
        plan = _get(self._plans, key)
        if plan is None:
            plan = _put(self._plans, key, self._plan(args, backend))
        if plan.template is not None:
            args = tuple(a if t is _TENSOR else t for a, t in zip(args, plan.template))
        if _EXPLAINING.get():
            raise _Explained(self._explain(plan.chosen, args))
        # The registered op adds nothing where no input needs a gradient, torch.compile is not tracing
        # and no dispatch, function or functorch mode sees the call: run the implementation directly.
        if (plan.direct and not (_is_compiling() or _dispatch_modes() or _function_modes() or _functorch())
                and not (torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad
                                                         for a in args))):
            if self.values is not None:
                self.values(*args)
            return self.impls[plan.chosen].run(*args)
        return self.op(*args, plan.chosen)

    def _plan(self, args, backend):
        given, args = args, self.validate(*args)
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        device = tensors[0].device
        chosen = self.dispatcher.select(backend, device, *args)
        direct = device.type in ("cpu", "cuda") and all(type(t) in (torch.Tensor, torch.nn.Parameter) for t in tensors)
        unchanged = all(a is b for a, b in zip(given, args))
        return _Plan(chosen, None if unchanged else tuple(_TENSOR if isinstance(a, torch.Tensor) else a for a in args),
                     direct)

    def _explain(self, chosen, args):
        device = next(a for a in args if isinstance(a, torch.Tensor)).device
        return Explanation(self.dispatcher.op, chosen,
                           {b: self.dispatcher.reasons(b, device, args) for b in self.dispatcher.order})


def explain(op, *args, **kwargs):
    """Which backend `op(*args, **kwargs)` would run on, and why each other backend would not, without
    running it: an `Explanation`. op: a public function of enat_kernels.ops or its name. The arguments
    are validated as the call would validate them (bad ones raise the same errors)."""
    from . import ops

    fn = getattr(ops, op, None) if isinstance(op, str) else op
    if fn is None or getattr(fn, "__module__", "").split(".")[:2] != ["enat_kernels", "ops"]:
        raise ValueError(f"op must be a public function of enat_kernels.ops or its name, got {op!r}")
    token = _EXPLAINING.set(True)
    try:
        fn(*args, **kwargs)
    except _Explained as e:
        return e.explanation
    finally:
        _EXPLAINING.reset(token)
    raise RuntimeError(f"{op!r} ran without reaching an enat op")

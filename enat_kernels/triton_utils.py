"""Triton plumbing shared by the kernels: optional import, interpreter mode, pinned and per-target
autotuning, the launcher. The token-movement kernels' tiles live in enat_kernels/ops/_tiles.py.

Triton kernels run on CUDA tensors, or on CPU tensors in the interpreter. Interpreter mode is chosen
by TRITON_INTERPRET=1 *before* triton is imported (tests/conftest.py sets it when there is no GPU),
and is read once here. The interpreter cannot autotune over several configs, so `autotune_configs`
keeps only the first one when interpreting or when ENAT_KERNELS_AUTOTUNE=0 (kernels with configs per
GPU generation, `target_autotune`, then run the first config of their target's list).
"""

import os
import warnings

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


# Configs per GPU generation. A kernel whose configs differ by target lists them per target family:
# "sm90" (wgmma: compute capability 9.x and 10.x) and "sm80" (mma.sync: 8.x and any other). At launch,
# autotuning tries only the family's configs (`target_autotune`); tests/test_gpu_targets.py compiles
# every one of them for sm_80 or sm_90 and fails on a spill, on more than 255 registers or on shared
# memory over the target's limit, so a config that does not fit cannot be added.

SHARED_MEMORY_LIMIT = {"sm80": 166912, "sm90": 232448}  # bytes per block: A100, H100
AOT_CAPABILITY = None  # the compute capability that launches on CPU tensors plan for (ahead-of-time compiles)


def target_family(capability):
    """"sm90" or "sm80" for a (major, minor) compute capability."""
    return "sm90" if capability is not None and 9 <= capability[0] <= 10 else "sm80"


def capability(tensors):
    """The compute capability of the GPU holding the first CUDA tensor among `tensors`; AOT_CAPABILITY when
    there is none (CPU tensors: the interpreter, or an ahead-of-time compile)."""
    import torch

    for t in tensors:
        if isinstance(t, torch.Tensor) and t.is_cuda:
            return torch.cuda.get_device_capability(t.device)
    return AOT_CAPABILITY


def target_autotune(configs, key, configs_for, prune=None):
    """triton.autotune over `configs` (those of every target), trying at each launch only those that
    `configs_for(family, **meta)` lists for the launch's GPU (`target_family`), then those `prune(configs,
    named_args)` keeps. With autotuning pinned, launch() runs the first of the target's list."""

    def early_config_prune(candidates, named_args, **meta):
        wanted = configs_for(target_family(capability(named_args.values())), **meta)
        kept = [c for c in candidates if any(c is w for w in wanted)]
        return prune(kept, named_args) if prune is not None else kept

    def decorate(fn):
        kernel = triton.autotune(configs=configs if not INTERPRET else configs[:1], key=key,
                                 prune_configs_by={"early_config_prune": early_config_prune})(fn)
        kernel.configs_for = configs_for
        return kernel

    return decorate


def kernels():
    """{name: kernel} of every Triton kernel of enat_kernels.ops (module-level objects named *_kernel)."""
    import importlib
    import pkgutil

    from . import ops

    found = {}
    for info in pkgutil.iter_modules(ops.__path__):
        module = importlib.import_module(f"{ops.__name__}.{info.name}")
        for name, obj in vars(module).items():
            if name.endswith("_kernel") and isinstance(obj, triton.runtime.KernelInterface):
                found[name] = obj
    return found


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


_TUNED = {}  # (kernel, autotuning key) -> the config autotuning chose


def launch(kernel, grid, args, meta, config=None, tune_key=None):
    """kernel[grid](*args, **meta), autotuned; or with `config` (a triton.Config), bypassing autotuning
    (tests run every configuration this way). With `tune_key` (the kernel's autotuning key for these
    arguments), the config autotuning chose is kept, and later calls of that key skip the autotuner's
    per-call work."""
    if config is None and not INTERPRET and hasattr(kernel, "configs_for") and os.environ.get(ENV_AUTOTUNE) == "0":
        config = kernel.configs_for(target_family(capability(args)), **meta)[0]  # pinned: the target's first
    if config is None and tune_key is not None:
        config = _TUNED.get((kernel, tune_key))
        if config is None:
            kernel[grid](*args, **meta)
            _TUNED[(kernel, tune_key)] = kernel.best_config
            return
    if config is None:
        kernel[grid](*args, **meta)
    else:
        kernel.fn[grid](*args, **meta, **config.all_kwargs())


_MOVED = {"MAX_BLOCK_D", "MAX_BLOCK_ROWS", "SEARCH_PROBES", "PREFIX_BLOCK", "row_tile", "rows_bucket", "block_rows",
          "search_rounds", "TOKEN_CONFIGS", "token_configs_for", "row_tile_columns", "tile_mask", "prefix_count",
          "search"}


def __getattr__(name):
    """The token-movement tiles' former names here: deprecated, from enat_kernels.ops._tiles."""
    if name not in _MOVED:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from .ops import _tiles

    warnings.warn(f"enat_kernels.triton_utils.{name} moved to enat_kernels.ops._tiles.{name}", DeprecationWarning,
                  stacklevel=2)
    return getattr(_tiles, name)

"""Triton plumbing shared by the kernels: optional import, interpreter mode, pinned autotuning, and the
tiles, configs and searches of the token-movement kernels (their design is described below).

Triton kernels run on CUDA tensors, or on CPU tensors in the interpreter. Interpreter mode is chosen
by TRITON_INTERPRET=1 *before* triton is imported (tests/conftest.py sets it when there is no GPU),
and is read once here. The interpreter cannot autotune over several configs, so `autotune_configs`
keeps only the first one when interpreting or when ENAT_KERNELS_AUTOTUNE=0 (kernels with configs per
GPU generation, `target_autotune`, then run the first config of their target's list).
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


# Token movement (ops/gather_scatter.py, ops/split_restore.py, ops/merge_cache.py; docs/OPS.md section 2).
#
# The kernels are copies, so their speed is the bytes each program keeps in flight. A program moves one
# [BLOCK_N, BLOCK_D] tile: BLOCK_D is D rounded up to a power of two (a constexpr, so a row is one
# vectorised access with no loop over D, and no column mask when D is a power of two), up to
# MAX_BLOCK_D; wider rows are split over a second grid axis, one tile per program still. BLOCK_N is
# set so that the tile holds about the config's TILE_BYTES (8-64 KB), at most MAX_BLOCK_ROWS and the
# bucket of the row count (`block_rows`; the kernels take TILE_BYTES, a constexpr, only for it). The
# bucket is also in every autotuning key, with BLOCK_D and the dtypes. Whatever positions or ranks a
# tile needs are computed once per program from the index or mask: a prefix count, or one PROBES-ary
# `search`, never a search per row. Data read once is loaded with eviction_policy="evict_first"; masks
# and index rows, which many programs read, with "evict_last".

MAX_BLOCK_D = 8192
MAX_BLOCK_ROWS = 64  # tiles compare their BLOCK_N index entries pairwise ([BLOCK_N, BLOCK_N])
SEARCH_PROBES = 64
PREFIX_BLOCK = 1024  # mask entries summed per step of a prefix count


def row_tile(D):
    """(BLOCK_D, EVEN_D, programs along D) for rows of D elements."""
    block_d = min(triton.next_power_of_2(D), MAX_BLOCK_D)
    return block_d, D % block_d == 0, triton.cdiv(D, block_d)


def rows_bucket(rows):
    """Power-of-two bucket of a row count: an autotuning key and the cap on BLOCK_N."""
    return min(triton.next_power_of_2(max(int(rows), 1)), 1024)


def block_rows(data):
    """A triton.heuristics function for BLOCK_N: rows of the tensor argument `data` per program, so that
    a tile is about TILE_BYTES (at least one row, at most MAX_BLOCK_ROWS and rows_key)."""

    def rows(args):
        row_bytes = args["BLOCK_D"] * args[data].element_size()
        return max(1, min(args["TILE_BYTES"] // row_bytes, MAX_BLOCK_ROWS, args["rows_key"]))

    return rows


def search_rounds(n):
    """Rounds of `search` over a range of n entries."""
    rounds = 0
    while n > 0:
        n = triton.cdiv(n, SEARCH_PROBES) - 1
        rounds += 1
    return rounds


if triton is not None:
    # The first config is the one the interpreter uses. 16 warps (at most 128 registers per thread) spilled
    # at width 366 and are not used.
    TOKEN_CONFIGS = [
        triton.Config({"TILE_BYTES": 32768}, num_warps=8),
        triton.Config({"TILE_BYTES": 16384}, num_warps=4),
        triton.Config({"TILE_BYTES": 8192}, num_warps=4),
    ]

    def token_configs_for(family, BLOCK_D, EVEN_D, **meta):
        """The token kernels' configs (any target): rows whose width is not a power of two (masked columns,
        moved element by element where unaligned, as ENAT-S's 366) take the 4-warp ones, rows under 64
        elements the 8-warp one; the combinations that compile without spills at the model's widths
        (tests/test_gpu_targets.py)."""
        if not EVEN_D:
            return TOKEN_CONFIGS[1:]
        return TOKEN_CONFIGS[:1] if BLOCK_D < 64 else TOKEN_CONFIGS

    @triton.jit
    def row_tile_columns(BLOCK_D: tl.constexpr):
        """The int64 columns of this program's tile (grid axis 1 walks rows wider than BLOCK_D)."""
        return tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)

    @triton.jit
    def tile_mask(rows_ok, columns, D, EVEN_D: tl.constexpr):
        """The tile mask of rows_ok [BLOCK_N] and columns < D; [BLOCK_N, 1] when EVEN_D (no column mask)."""
        mask = rows_ok[:, None]
        if not EVEN_D:
            mask = mask & (columns[None, :] < D)
        return mask

    @triton.jit
    def prefix_count(row_ptr, stride, end, BLOCK: tl.constexpr):
        """Nonzero entries of the uint8 row (row_ptr, stride) in [0, end), BLOCK at a time."""
        total = 0
        for start in range(0, end, BLOCK):
            p = start + tl.arange(0, BLOCK)
            flags = tl.load(row_ptr + p.to(tl.int64) * stride, mask=p < end, other=0, eviction_policy="evict_last")
            total += tl.sum((flags != 0).to(tl.int32), 0)
        return total

    @triton.jit
    def search(row_ptr, stride, lo, hi, bound, other_ptr, other_stride, diagonal, rounds,
               MERGE_PATH: tl.constexpr, PROBES: tl.constexpr):
        """The first p in [lo, hi) where row[p] < limit(p) fails (hi if it never does), for a predicate
        that holds on a prefix of [lo, hi). limit(p) is `bound`, or with MERGE_PATH other[diagonal - 1 - p]
        (the merge-path split of two ascending int64 rows: row entries among the first `diagonal`).

        Each of `rounds` rounds loads PROBES evenly spaced entries at once and keeps the piece of
        [lo, hi] that holds the answer, so a program waits on `rounds` dependent loads (2 up to 4096
        entries), not log2(hi - lo). The answer stays in [lo, hi] whatever the row holds."""
        k = tl.arange(0, PROBES)
        for _ in range(rounds):
            width = tl.cdiv(hi - lo, PROBES)
            p = lo + (k + 1) * width - 1
            ok = (p >= lo) & (p < hi)
            entry = tl.load(row_ptr + p.to(tl.int64) * stride, mask=ok, other=0, eviction_policy="evict_last")
            if MERGE_PATH:
                limit = tl.load(other_ptr + (diagonal - 1 - p).to(tl.int64) * other_stride, mask=ok, other=0,
                                eviction_policy="evict_last")
            else:
                limit = bound
            below = tl.sum((ok & (entry < limit)).to(tl.int32), 0)
            hi = tl.where(below < tl.sum(ok.to(tl.int32), 0), lo + (below + 1) * width - 1, hi)
            lo = lo + below * width
        return lo

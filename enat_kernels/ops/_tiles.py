"""The row tiles shared by the token-movement kernels (gather_scatter.py, split_restore.py,
merge_cache.py; docs/OPS.md section 2): tile sizes, configs, the kernel decorator and launcher, the
in-kernel tile helpers and searches, and which tensors each backend's row kernels move.

The kernels are copies, so their speed is the bytes each program keeps in flight. A program moves one
[BLOCK_N, BLOCK_D] tile: BLOCK_D is D rounded up to a power of two (a constexpr, so a row is one
vectorised access with no loop over D, and no column mask when D is a power of two), up to
MAX_BLOCK_D; wider rows are split over a second grid axis, one tile per program still. BLOCK_N is
set so that the tile holds about the config's TILE_BYTES (8-64 KB), at most MAX_BLOCK_ROWS and the
bucket of the row count (`block_rows`; the kernels take TILE_BYTES, a constexpr, only for it). The
bucket is also in every autotuning key, with BLOCK_D and the dtypes. Whatever positions or ranks a
tile needs are computed once per program from the index or mask: a prefix count, or one PROBES-ary
`search`, never a search per row. Data read once is loaded with eviction_policy="evict_first"; masks
and index rows, which many programs read, with "evict_last".
"""

import torch

from .. import checks, triton_utils

triton, tl = triton_utils.triton, triton_utils.tl

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


def launch(kernel, batches, rows, D, args, meta, config):
    """Run a token kernel over batches * ceil(rows / BLOCK_N) tiles of rows of D elements (times the
    programs along D of rows wider than MAX_BLOCK_D), BLOCK_D and EVEN_D added to `meta`; `config` (a
    triton.Config) bypasses autotuning."""
    block_d, even_d, d_tiles = row_tile(D)
    triton_utils.launch(kernel, lambda m: (batches * triton.cdiv(rows, m["BLOCK_N"]), d_tiles), args,
                        dict(meta, BLOCK_D=block_d, EVEN_D=even_d), config)


# Which tensors the row kernels move.

TRITON_DTYPES = (
    torch.float16, torch.bfloat16, torch.float32, torch.float64,
    torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64,
)


def triton_why_not(**tensors):
    """Dtypes the Triton row kernels move (any strides)."""
    return [f"the Triton kernels do not move {t.dtype} ({name})" for name, t in tensors.items() if t.dtype not in TRITON_DTYPES]


def cuda_why_not(**tensors):
    """The CUDA row kernels (csrc/cuda/gather_tokens.cu, csrc/cuda/tokens.cu) move any dtype, but need
    rows contiguous in their last dimension."""
    return checks.strided_rows_reasons(**tensors)


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

    def jit_tiles(data, *key):
        """Decorate a token kernel: jit, BLOCK_N from the tensor argument `data` (`block_rows`), and
        autotuned over TOKEN_CONFIGS keyed on the row bucket, BLOCK_D, EVEN_D and the constexprs `key`."""

        def decorate(fn):
            tiled = triton.heuristics({"BLOCK_N": block_rows(data)})(triton.jit(fn))
            return triton_utils.target_autotune(TOKEN_CONFIGS, key=["rows_key", "BLOCK_D", "EVEN_D", *key],
                                                configs_for=token_configs_for)(tiled)

        return decorate

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

"""merge_cache: the union of two position-indexed row sets, in ascending position order.

After a reuse step, ENAT's visible set is the freshly encoded critical tokens fresh (B, nf, D) at
fresh_index (B, nf) together with the projected cached tokens cached (B, nc, D) at cached_index
(B, nc). The result is (B, nf + nc, D). Each row of a set lands at its rank in the union:
fresh row j goes to j + #{cached positions below fresh_index[j]}, and likewise for cached rows,
so one launch moves every row once, with no sort: the Triton kernel ranks a tile of merged rows from
one merge-path search per program (see below). The backward reads the gradient rows back from the
same ranks (merge_cache_backward, one launch).

Precondition: both index tensors hold ascending positions and the two sets are disjoint; checked
for CPU tensors, and for CUDA tensors with ENAT_KERNELS_DEBUG=1.
"""

import torch

from .. import checks
from .._library import define, register_cuda_fake
from ..backends import Dispatcher, Entry
from . import _tiles
from ._tiles import cuda_why_not, triton_why_not

triton, tl = _tiles.triton, _tiles.tl

# Reference (plain PyTorch).


def merge_cache_reference(fresh, fresh_index, cached, cached_index):
    order = torch.argsort(torch.cat([fresh_index, cached_index], dim=1), dim=1, stable=True)
    rows = torch.cat([fresh, cached], dim=1)
    return torch.gather(rows, 1, order.unsqueeze(-1).expand(-1, -1, rows.shape[2]))


def _union_ranks(index, other_index):
    """Rank in the union of each position of `index` (B, n), given the disjoint `other_index` (B, m)."""
    below = torch.searchsorted(other_index.contiguous(), index.contiguous())
    return below + torch.arange(index.shape[1], device=index.device)


def merge_cache_backward_reference(grad, fresh_index, cached_index):
    D = grad.shape[2]
    return tuple(
        torch.gather(grad, 1, _union_ranks(own, other).unsqueeze(-1).expand(-1, -1, D))
        for own, other in ((fresh_index, cached_index), (cached_index, fresh_index))
    )


# Triton: one launch over (row b, tile of BLOCK_N merged rows m0 <= m < m0 + BLOCK_N), with the tiles
# and configs of _tiles.py. One merge-path search per program finds f0, the fresh rows among the
# first m0 merged rows (and so c0 = m0 - f0 cached ones); the tile's rows are the BLOCK_N smallest of
# the next BLOCK_N positions of each side, ranked by [BLOCK_N, BLOCK_N] comparisons. The forward loads
# the tile from the two sides under complementary row masks and stores it once; the backward loads the
# gradient tile once and stores it to the two sides. Whatever the index rows hold, every access stays
# inside its tensor.

if triton is not None:

    @_tiles.jit_tiles("merged_ptr", "FORWARD")
    def _merge_rows_kernel(
        fresh_ptr, fresh_index_ptr, cached_ptr, cached_index_ptr, merged_ptr, nf, nc, D, rows_key, rounds,
        sf_b, sf_n, sf_d, sfi_b, sfi_n, sc_b, sc_n, sc_d, sci_b, sci_n, sm_b, sm_n, sm_d,
        FORWARD: tl.constexpr, TILE_BYTES: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        EVEN_D: tl.constexpr, PROBES: tl.constexpr,
    ):
        """FORWARD: merged[b, m] from fresh or cached for the merged rows m0 <= m < m0 + BLOCK_N of row
        b; else the reverse (gradient rows back to the two sides)."""
        tiles = tl.cdiv(nf + nc, BLOCK_N)
        b = (tl.program_id(0) // tiles).to(tl.int64)
        m0 = (tl.program_id(0) % tiles) * BLOCK_N
        fresh_row = fresh_index_ptr + b * sfi_b
        cached_row = cached_index_ptr + b * sci_b
        f0 = _tiles.search(fresh_row, sfi_n, tl.maximum(m0 - nc, 0), tl.minimum(m0, nf), 0, cached_row, sci_n,
                           m0, rounds, MERGE_PATH=True, PROBES=PROBES)
        c0 = m0 - f0
        k = tl.arange(0, BLOCK_N)
        f_ok = f0 + k < nf
        past_end = 0x7FFFFFFFFFFFFFFF  # above every position
        f_pos = tl.load(fresh_row + (f0 + k).to(tl.int64) * sfi_n, mask=f_ok, other=past_end,
                        eviction_policy="evict_last")
        c_pos = tl.load(cached_row + (c0 + k).to(tl.int64) * sci_n, mask=c0 + k < nc, other=past_end,
                        eviction_policy="evict_last")
        # Fresh entry k is merged row m0 + f_rank[k]: k fresh and the cached entries below it come first.
        f_rank = tl.where(f_ok, k + tl.sum((c_pos[None, :] < f_pos[:, None]).to(tl.int32), 1), BLOCK_N)
        from_fresh = tl.sum((f_rank[None, :] == k[:, None]).to(tl.int32), 1) > 0
        fresh_before = tl.sum((f_rank[None, :] < k[:, None]).to(tl.int32), 1)
        f_src = f0 + fresh_before
        c_src = c0 + k - fresh_before
        row = m0 + k
        row_ok = row < nf + nc
        columns = _tiles.row_tile_columns(BLOCK_D)
        m_tile = _tiles.tile_mask(row_ok, columns, D, EVEN_D)
        f_tile = _tiles.tile_mask(row_ok & from_fresh, columns, D, EVEN_D)
        c_tile = _tiles.tile_mask(row_ok & ~from_fresh & (c_src < nc), columns, D, EVEN_D)
        merged = merged_ptr + (b * sm_b + row.to(tl.int64) * sm_n)[:, None] + columns[None, :] * sm_d
        fresh = fresh_ptr + (b * sf_b + f_src.to(tl.int64) * sf_n)[:, None] + columns[None, :] * sf_d
        cached = cached_ptr + (b * sc_b + c_src.to(tl.int64) * sc_n)[:, None] + columns[None, :] * sc_d
        if FORWARD:
            value = tl.zeros([BLOCK_N, BLOCK_D], merged_ptr.dtype.element_ty)
            value = tl.load(fresh, mask=f_tile, other=value, eviction_policy="evict_first")
            value = tl.load(cached, mask=c_tile, other=value, eviction_policy="evict_first")
            tl.store(merged, value, mask=m_tile)
        else:
            value = tl.load(merged, mask=m_tile, eviction_policy="evict_first")
            tl.store(fresh, value, mask=f_tile)
            tl.store(cached, value, mask=c_tile)


def _merge_rows_triton(fresh, fresh_index, cached, cached_index, merged, forward, config):
    """Between fresh (B, nf, D) at fresh_index (B, nf), cached (B, nc, D) at cached_index (B, nc) and
    merged (B, nf + nc, D): forward fills merged, backward fills fresh and cached."""
    B, nf = fresh_index.shape
    nc = cached_index.shape[1]
    D = merged.shape[2]
    if B == 0 or nf + nc == 0 or D == 0:
        return
    args = (fresh, fresh_index, cached, cached_index, merged, nf, nc, D, _tiles.rows_bucket(nf + nc),
            _tiles.search_rounds(min(nf, nc)),
            *fresh.stride(), *fresh_index.stride(), *cached.stride(), *cached_index.stride(), *merged.stride())
    _tiles.launch(_merge_rows_kernel, B, nf + nc, D, args, dict(FORWARD=forward, PROBES=_tiles.SEARCH_PROBES), config)


def merge_cache_triton(fresh, fresh_index, cached, cached_index, *, config=None):
    """fresh (B, nf, D), fresh_index (B, nf), cached (B, nc, D), cached_index (B, nc) -> (B, nf + nc, D).
    `config` (a triton.Config) bypasses autotuning."""
    B, nf, D = fresh.shape
    merged = fresh.new_empty((B, nf + cached.shape[1], D))
    _merge_rows_triton(fresh, fresh_index, cached, cached_index, merged, True, config)
    return merged


def merge_cache_backward_triton(grad, fresh_index, cached_index, *, config=None):
    """grad (B, nf + nc, D), fresh_index (B, nf), cached_index (B, nc) -> ((B, nf, D), (B, nc, D))."""
    B, _, D = grad.shape
    grad_fresh = grad.new_empty((B, fresh_index.shape[1], D))
    grad_cached = grad.new_empty((B, cached_index.shape[1], D))
    _merge_rows_triton(grad_fresh, fresh_index, grad_cached, cached_index, grad, False, config)
    return grad_fresh, grad_cached


# Dispatch, registration, autograd.

MERGE = Dispatcher("merge_cache", values=lambda fresh, fi, cached, ci: _check_values(fi, ci))
MERGE.register("reference", merge_cache_reference)
MERGE.register("triton", merge_cache_triton, lambda fresh, fi, cached, ci: triton_why_not(fresh=fresh, cached=cached))
MERGE.register("cuda", lambda *a: torch.ops.enat.merge_cache_cuda(*a),
               lambda fresh, fi, cached, ci: cuda_why_not(fresh=fresh, cached=cached))

MERGE_BACKWARD = Dispatcher("merge_cache_backward", values=lambda grad, fi, ci: _check_values(fi, ci))
MERGE_BACKWARD.register("reference", merge_cache_backward_reference)
MERGE_BACKWARD.register("triton", merge_cache_backward_triton, lambda grad, fi, ci: triton_why_not(grad=grad))
MERGE_BACKWARD.register("cuda", lambda *a: torch.ops.enat.merge_cache_backward_cuda(*a),
                        lambda grad, fi, ci: cuda_why_not(grad=grad))


def _check_values(fresh_index, cached_index):
    checks.index_values("fresh_index", fresh_index)
    checks.index_values("cached_index", cached_index)
    if fresh_index.numel() and cached_index.numel() and checks.values_checked(fresh_index):
        union = torch.cat([fresh_index, cached_index], dim=1).sort(dim=1).values
        if not bool((union[:, 1:] > union[:, :-1]).all()):
            raise ValueError(
                "fresh_index and cached_index must be disjoint in each row; got fresh_index: "
                f"{checks.describe(fresh_index)}, cached_index: {checks.describe(cached_index)}"
            )


def _router(fresh, fresh_index, cached, cached_index, backend):
    return MERGE.run(backend, fresh.device, fresh, fresh_index, cached, cached_index)


def _backward_router(grad, fresh_index, cached_index, backend):
    return MERGE_BACKWARD.run(backend, grad.device, grad, fresh_index, cached_index)


def _fake(fresh, fresh_index, cached, cached_index, backend=None):
    return fresh.new_empty((fresh.shape[0], fresh.shape[1] + cached.shape[1], fresh.shape[2]))


def _backward_fake(grad, fresh_index, cached_index, backend=None):
    B, _, D = grad.shape
    return grad.new_empty((B, fresh_index.shape[1], D)), grad.new_empty((B, cached_index.shape[1], D))


define("merge_cache(Tensor fresh, Tensor fresh_index, Tensor cached, Tensor cached_index, str backend) -> Tensor",
       _router, _fake)
# Backward-only op, one launch.
define("merge_cache_backward(Tensor grad, Tensor fresh_index, Tensor cached_index, str backend) -> (Tensor, Tensor)",
       _backward_router, _backward_fake)
register_cuda_fake("merge_cache_cuda", _fake)
register_cuda_fake("merge_cache_backward_cuda", _backward_fake)


def _setup(ctx, inputs, output):
    fresh, fresh_index, cached, cached_index, backend = inputs
    ctx.save_for_backward(fresh_index, cached_index)
    ctx.backend = backend


def _backward(ctx, grad):
    fresh_index, cached_index = ctx.saved_tensors
    chosen = MERGE_BACKWARD.select(None, grad.device, grad, fresh_index, cached_index, preferred=ctx.backend)
    grad_fresh, grad_cached = torch.ops.enat.merge_cache_backward(grad, fresh_index, cached_index, chosen)
    return grad_fresh, None, grad_cached, None, None


torch.library.register_autograd("enat::merge_cache", _backward, setup_context=_setup)


def merge_cache(fresh, fresh_index, cached, cached_index, *, backend=None):
    """Union of fresh (B, nf, D) at fresh_index (B, nf) and cached (B, nc, D) at cached_index (B, nc),
    ordered by ascending position -> (B, nf + nc, D). Either side may be empty."""
    return _MERGE(fresh, fresh_index, cached, cached_index, backend=backend)


def _check(fresh, fresh_index, cached, cached_index):
    checks.tensor("fresh", fresh, "B nf D")
    checks.tensor("cached", cached, "B nc D")
    checks.index("fresh_index", fresh_index, "fresh", fresh)
    checks.index("cached_index", cached_index, "cached", cached)
    checks.same_device(fresh=fresh, cached=cached)
    checks.same_dtype(fresh=fresh, cached=cached)
    checks.size_equal("fresh_index", fresh_index, 1, "fresh", fresh, 1)
    checks.size_equal("cached_index", cached_index, 1, "cached", cached, 1)
    checks.size_equal("cached", cached, 0, "fresh", fresh, 0)
    checks.size_equal("cached", cached, 2, "fresh", fresh, 2)
    return fresh, fresh_index, cached, cached_index


_MERGE = Entry(MERGE, _check)

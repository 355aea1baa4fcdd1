"""merge_cache: the union of two position-indexed row sets, in ascending position order.

After a reuse step, ENAT's visible set is the freshly encoded critical tokens fresh (B, nf, D) at
fresh_index (B, nf) together with the projected cached tokens cached (B, nc, D) at cached_index
(B, nc). The result is (B, nf + nc, D). Each row of a set lands at its rank in the union:
fresh row j goes to j + #{cached positions below fresh_index[j]}, and likewise for cached rows,
so one launch moves every row once, with a binary search per row and no sort. The backward reads
the gradient rows back from the same ranks (merge_cache_backward, one launch).

Precondition: both index tensors hold ascending positions and the two sets are disjoint; checked
for CPU tensors, and for CUDA tensors with ENAT_KERNELS_DEBUG=1.
"""

import torch

from .. import triton_utils
from .._library import register_cuda_fake, register_router
from ..backends import Dispatcher
from . import _checks
from .gather_scatter import cuda_why_not, triton_why_not

triton, tl = triton_utils.triton, triton_utils.tl

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


# Triton: each program moves a block of BLOCK_R fresh rows and the same block of cached rows.

if triton is not None:

    @triton.jit
    def _move_side(rows_ptr, s_b, s_n, s_d, own_ptr, own_b, own_n, n_own, other_ptr, other_b, other_n, n_other, steps,
                   merged_ptr, sm_b, sm_n, sm_d, b, j, D, FORWARD: tl.constexpr, BLOCK_D: tl.constexpr):
        """Rows j of one side to (FORWARD) or from their ranks in the merged rows."""
        row_ok = j < n_own
        position = tl.load(own_ptr + b * own_b + j.to(tl.int64) * own_n, mask=row_ok, other=0)
        rank = j.to(tl.int64) + triton_utils.lower_bound(other_ptr + b * other_b, other_n, n_other, position, steps)
        side_rows = rows_ptr + b * s_b + j[:, None].to(tl.int64) * s_n
        merged_rows = merged_ptr + b * sm_b + rank[:, None] * sm_n
        for d0 in range(0, D, BLOCK_D):
            cols = (d0 + tl.arange(0, BLOCK_D)).to(tl.int64)
            m = row_ok[:, None] & (cols[None, :] < D)
            if FORWARD:
                tl.store(merged_rows + cols[None, :] * sm_d, tl.load(side_rows + cols[None, :] * s_d, mask=m), mask=m)
            else:
                tl.store(side_rows + cols[None, :] * s_d, tl.load(merged_rows + cols[None, :] * sm_d, mask=m), mask=m)

    @triton.autotune(
        configs=triton_utils.autotune_configs(
            [
                triton.Config({"BLOCK_R": 4, "BLOCK_D": 256}, num_warps=4),
                triton.Config({"BLOCK_R": 2, "BLOCK_D": 512}, num_warps=4),
                triton.Config({"BLOCK_R": 1, "BLOCK_D": 1024}, num_warps=4),
                triton.Config({"BLOCK_R": 8, "BLOCK_D": 128}, num_warps=4),
            ]
        ),
        key=["D", "FORWARD"],
    )
    @triton.jit
    def _merge_rows_kernel(
        fresh_ptr, fresh_index_ptr, cached_ptr, cached_index_ptr, merged_ptr, nf, nc, D, steps_f, steps_c,
        sf_b, sf_n, sf_d, sfi_b, sfi_n, sc_b, sc_n, sc_d, sci_b, sci_n, sm_b, sm_n, sm_d,
        FORWARD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """FORWARD: merged[b, rank(j)] = side[b, j] for both sides; else side[b, j] = merged[b, rank(j)]."""
        pid = tl.program_id(0)
        blocks_per_row = tl.cdiv(tl.maximum(nf, nc), BLOCK_R)
        b = (pid // blocks_per_row).to(tl.int64)
        j = (pid % blocks_per_row) * BLOCK_R + tl.arange(0, BLOCK_R)
        _move_side(fresh_ptr, sf_b, sf_n, sf_d, fresh_index_ptr, sfi_b, sfi_n, nf, cached_index_ptr, sci_b, sci_n, nc,
                   steps_c, merged_ptr, sm_b, sm_n, sm_d, b, j, D, FORWARD, BLOCK_D)
        _move_side(cached_ptr, sc_b, sc_n, sc_d, cached_index_ptr, sci_b, sci_n, nc, fresh_index_ptr, sfi_b, sfi_n, nf,
                   steps_f, merged_ptr, sm_b, sm_n, sm_d, b, j, D, FORWARD, BLOCK_D)


def _merge_rows_triton(fresh, fresh_index, cached, cached_index, merged, forward):
    B, nf = fresh_index.shape
    nc = cached_index.shape[1]
    D = merged.shape[2]
    if B == 0 or nf + nc == 0 or D == 0:
        return

    def grid(meta):
        return (B * triton.cdiv(max(nf, nc), meta["BLOCK_R"]),)

    _merge_rows_kernel[grid](
        fresh, fresh_index, cached, cached_index, merged, nf, nc, D,
        triton_utils.search_steps(nf), triton_utils.search_steps(nc),
        *fresh.stride(), *fresh_index.stride(), *cached.stride(), *cached_index.stride(), *merged.stride(),
        FORWARD=forward,
    )


def merge_cache_triton(fresh, fresh_index, cached, cached_index):
    B, nf, D = fresh.shape
    merged = fresh.new_empty((B, nf + cached.shape[1], D))
    _merge_rows_triton(fresh, fresh_index, cached, cached_index, merged, forward=True)
    return merged


def merge_cache_backward_triton(grad, fresh_index, cached_index):
    B, _, D = grad.shape
    grad_fresh = grad.new_empty((B, fresh_index.shape[1], D))
    grad_cached = grad.new_empty((B, cached_index.shape[1], D))
    _merge_rows_triton(grad_fresh, fresh_index, grad_cached, cached_index, grad, forward=False)
    return grad_fresh, grad_cached


# Dispatch, registration, autograd.

MERGE = Dispatcher("merge_cache")
MERGE.register("reference", merge_cache_reference)
MERGE.register("triton", merge_cache_triton, lambda fresh, fi, cached, ci: triton_why_not(fresh=fresh, cached=cached))
MERGE.register("cuda", lambda *a: torch.ops.enat.merge_cache_cuda(*a),
               lambda fresh, fi, cached, ci: cuda_why_not(fresh=fresh, cached=cached))

MERGE_BACKWARD = Dispatcher("merge_cache_backward")
MERGE_BACKWARD.register("reference", merge_cache_backward_reference)
MERGE_BACKWARD.register("triton", merge_cache_backward_triton, lambda grad, fi, ci: triton_why_not(grad=grad))
MERGE_BACKWARD.register("cuda", lambda *a: torch.ops.enat.merge_cache_backward_cuda(*a),
                        lambda grad, fi, ci: cuda_why_not(grad=grad))


def _check_values(fresh_index, cached_index):
    _checks.index_values("fresh_index", fresh_index)
    _checks.index_values("cached_index", cached_index)
    if fresh_index.numel() and cached_index.numel() and _checks.values_checked(fresh_index):
        union = torch.cat([fresh_index, cached_index], dim=1).sort(dim=1).values
        if not bool((union[:, 1:] > union[:, :-1]).all()):
            raise ValueError(
                "fresh_index and cached_index must be disjoint in each row; got fresh_index: "
                f"{_checks.describe(fresh_index)}, cached_index: {_checks.describe(cached_index)}"
            )


def _router(fresh, fresh_index, cached, cached_index, backend):
    _check_values(fresh_index, cached_index)
    return MERGE.run(backend, fresh.device, fresh, fresh_index, cached, cached_index)


def _backward_router(grad, fresh_index, cached_index, backend):
    _check_values(fresh_index, cached_index)
    return MERGE_BACKWARD.run(backend, grad.device, grad, fresh_index, cached_index)


register_router("merge_cache", _router)
register_router("merge_cache_backward", _backward_router)


def _fake(fresh, fresh_index, cached, cached_index, backend=None):
    return fresh.new_empty((fresh.shape[0], fresh.shape[1] + cached.shape[1], fresh.shape[2]))


def _backward_fake(grad, fresh_index, cached_index, backend=None):
    B, _, D = grad.shape
    return grad.new_empty((B, fresh_index.shape[1], D)), grad.new_empty((B, cached_index.shape[1], D))


torch.library.register_fake("enat::merge_cache")(_fake)
torch.library.register_fake("enat::merge_cache_backward")(_backward_fake)
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
    _checks.tensor("fresh", fresh, "B nf D")
    _checks.tensor("cached", cached, "B nc D")
    _checks.index("fresh_index", fresh_index, "fresh", fresh)
    _checks.index("cached_index", cached_index, "cached", cached)
    _checks.same_device(fresh=fresh, cached=cached)
    _checks.same_dtype(fresh=fresh, cached=cached)
    _checks.size_equal("fresh_index", fresh_index, 1, "fresh", fresh, 1)
    _checks.size_equal("cached_index", cached_index, 1, "cached", cached, 1)
    _checks.size_equal("cached", cached, 0, "fresh", fresh, 0)
    _checks.size_equal("cached", cached, 2, "fresh", fresh, 2)
    chosen = MERGE.select(backend, fresh.device, fresh, fresh_index, cached, cached_index)
    return torch.ops.enat.merge_cache(fresh, fresh_index, cached, cached_index, chosen)

"""split_tokens and restore_tokens: split a sequence (B, L, D) by a (B, L) bool mask into its visible
rows (B, L-n, D) and masked rows (B, n, D), both in ascending position order, and put them back.

Each is the other's backward. Every row of the mask has the same number n of True (masked) entries;
checked for CPU tensors, and for CUDA tensors with ENAT_KERNELS_DEBUG=1.
"""

import torch

from .. import checks
from .._library import define, register_cuda_fake
from ..backends import Dispatcher, Entry
from . import _tiles
from ._tiles import cuda_why_not, triton_why_not
from .gather_scatter import _rows, gather_tokens_reference
from .mask_to_index import TRITON_MAX_L, mask_to_index_reference

triton, tl = _tiles.triton, _tiles.tl


def _positions(mask, n_masked):
    """(visible positions (B, L-n), masked positions (B, n))."""
    return mask_to_index_reference(~mask, mask.shape[1] - n_masked), mask_to_index_reference(mask, n_masked)


def split_tokens_reference(x, mask, n_masked):
    visible, masked = _positions(mask, n_masked)
    return gather_tokens_reference(x, visible), gather_tokens_reference(x, masked)


def restore_tokens_reference(visible, masked, mask):
    B, L = mask.shape
    out = visible.new_empty((B, L, visible.shape[2]))
    for rows, pos in zip((visible, masked), _positions(mask, masked.shape[1])):
        out.scatter_(1, _rows(pos, out.shape[2]), rows)
    return out


# Triton: one launch over (row b, tile of BLOCK_N positions), with the tiles and configs of
# _tiles.py. A program counts the masked positions before its tile once (a prefix count over the
# mask row, which stays in L2), takes a prefix sum within the tile, and so knows every position's rank
# among the masked or the visible rows. Split then loads the x tile once and stores it twice, under
# complementary row masks, at those ranks; restore loads the two at the ranks and stores one tile.
# A position whose rank is past its set (a mask row with the wrong count) is skipped, and restore
# zero-fills it, so nothing goes out of bounds.

if triton is not None:

    @_tiles.jit_tiles("x_ptr", "SPLIT")
    def _split_restore_kernel(
        x_ptr, mask_ptr, visible_ptr, masked_ptr, L, n_masked, D, rows_key,
        sx_b, sx_l, sx_d, sm_b, sm_l, sv_b, sv_n, sv_d, sk_b, sk_n, sk_d,
        SPLIT: tl.constexpr, TILE_BYTES: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        EVEN_D: tl.constexpr, PREFIX_BLOCK: tl.constexpr,
    ):
        """SPLIT: x -> (visible, masked); else (visible, masked) -> x, for the positions
        l0 <= l < l0 + BLOCK_N of one row b of the mask."""
        tiles = tl.cdiv(L, BLOCK_N)
        b = (tl.program_id(0) // tiles).to(tl.int64)
        l0 = (tl.program_id(0) % tiles) * BLOCK_N
        mask_row = mask_ptr + b * sm_b
        pos = l0 + tl.arange(0, BLOCK_N)
        pos_ok = pos < L
        is_masked = tl.load(mask_row + pos.to(tl.int64) * sm_l, mask=pos_ok, other=0, eviction_policy="evict_last") != 0
        before = _tiles.prefix_count(mask_row, sm_l, l0, PREFIX_BLOCK)  # masked positions in [0, l0)
        masked_up_to = before + tl.cumsum(is_masked.to(tl.int32), 0)  # masked positions in [0, pos]
        masked_rank = masked_up_to - 1
        visible_rank = pos - masked_up_to
        columns = _tiles.row_tile_columns(BLOCK_D)
        x_tile = _tiles.tile_mask(pos_ok, columns, D, EVEN_D)
        k_tile = _tiles.tile_mask(pos_ok & is_masked & (masked_rank < n_masked), columns, D, EVEN_D)
        v_tile = _tiles.tile_mask(pos_ok & ~is_masked & (visible_rank < L - n_masked), columns, D, EVEN_D)
        x = x_ptr + (b * sx_b + pos.to(tl.int64) * sx_l)[:, None] + columns[None, :] * sx_d
        k = masked_ptr + (b * sk_b + masked_rank.to(tl.int64) * sk_n)[:, None] + columns[None, :] * sk_d
        v = visible_ptr + (b * sv_b + visible_rank.to(tl.int64) * sv_n)[:, None] + columns[None, :] * sv_d
        if SPLIT:
            value = tl.load(x, mask=x_tile, eviction_policy="evict_first")
            tl.store(k, value, mask=k_tile)
            tl.store(v, value, mask=v_tile)
        else:
            value = tl.zeros([BLOCK_N, BLOCK_D], x_ptr.dtype.element_ty)
            value = tl.load(k, mask=k_tile, other=value, eviction_policy="evict_first")
            value = tl.load(v, mask=v_tile, other=value, eviction_policy="evict_first")
            tl.store(x, value, mask=x_tile)


def _split_restore_triton(x, mask, visible, masked, split, config):
    """Split x (B, L, D) into visible (B, L-n, D) and masked (B, n, D) by mask (B, L), or restore it."""
    B, L, D = x.shape
    if x.numel() == 0:
        return
    as_bytes = mask.view(torch.uint8)
    args = (x, as_bytes, visible, masked, L, masked.shape[1], D, _tiles.rows_bucket(L),
            *x.stride(), *as_bytes.stride(), *visible.stride(), *masked.stride())
    _tiles.launch(_split_restore_kernel, B, L, D, args, dict(SPLIT=split, PREFIX_BLOCK=_tiles.PREFIX_BLOCK), config)


def split_tokens_triton(x, mask, n_masked, *, config=None):
    """x (B, L, D), mask (B, L) -> (visible (B, L-n, D), masked (B, n, D)). `config` bypasses autotuning."""
    B, L, D = x.shape
    visible, masked = x.new_empty((B, L - n_masked, D)), x.new_empty((B, n_masked, D))
    _split_restore_triton(x, mask, visible, masked, True, config)
    return visible, masked


def restore_tokens_triton(visible, masked, mask, *, config=None):
    """visible (B, L-n, D), masked (B, n, D), mask (B, L) -> (B, L, D)."""
    B, L = mask.shape
    out = visible.new_empty((B, L, visible.shape[2]))
    _split_restore_triton(out, mask, visible, masked, False, config)
    return out


def _row_limit(mask):
    L = mask.shape[1]
    return [f"rows of {L} positions are above the Triton kernel's {TRITON_MAX_L}"] if L > TRITON_MAX_L else []


SPLIT = Dispatcher("split_tokens", values=lambda x, mask, n: checks.mask_counts("mask", mask, "n_masked", n))
SPLIT.register("reference", split_tokens_reference)
SPLIT.register("triton", split_tokens_triton, lambda x, mask, n: triton_why_not(x=x) + _row_limit(mask))
SPLIT.register("cuda", lambda *a: torch.ops.enat.split_tokens_cuda(*a), lambda x, mask, n: cuda_why_not(x=x))

RESTORE = Dispatcher("restore_tokens", values=lambda visible, masked, mask: checks.mask_counts(
    "mask", mask, "masked.shape[1]", masked.shape[1]))
RESTORE.register("reference", restore_tokens_reference)
RESTORE.register("triton", restore_tokens_triton,
                 lambda visible, masked, mask: triton_why_not(visible=visible, masked=masked) + _row_limit(mask))
RESTORE.register("cuda", lambda *a: torch.ops.enat.restore_tokens_cuda(*a),
                 lambda visible, masked, mask: cuda_why_not(visible=visible, masked=masked))


def _split_router(x, mask, n_masked, backend):
    return SPLIT.run(backend, x.device, x, mask, n_masked)


def _restore_router(visible, masked, mask, backend):
    return RESTORE.run(backend, visible.device, visible, masked, mask)


def _split_fake(x, mask, n_masked, backend=None):
    B, L, D = x.shape
    return x.new_empty((B, L - n_masked, D)), x.new_empty((B, n_masked, D))


def _restore_fake(visible, masked, mask, backend=None):
    return visible.new_empty((mask.shape[0], mask.shape[1], visible.shape[2]))


define("split_tokens(Tensor x, Tensor mask, SymInt n_masked, str backend) -> (Tensor, Tensor)", _split_router,
       _split_fake)
define("restore_tokens(Tensor visible, Tensor masked, Tensor mask, str backend) -> Tensor", _restore_router,
       _restore_fake)
register_cuda_fake("split_tokens_cuda", _split_fake)
register_cuda_fake("restore_tokens_cuda", _restore_fake)


def _call_split(x, mask, n_masked, backend=None, preferred=None):
    chosen = SPLIT.select(backend, x.device, x, mask, n_masked, preferred=preferred)
    return torch.ops.enat.split_tokens(x, mask, n_masked, chosen)


def _call_restore(visible, masked, mask, backend=None, preferred=None):
    chosen = RESTORE.select(backend, visible.device, visible, masked, mask, preferred=preferred)
    return torch.ops.enat.restore_tokens(visible, masked, mask, chosen)


def _split_setup(ctx, inputs, output):
    x, mask, n_masked, backend = inputs
    ctx.save_for_backward(mask)
    ctx.backend = backend


def _split_backward(ctx, grad_visible, grad_masked):
    (mask,) = ctx.saved_tensors
    return _call_restore(grad_visible, grad_masked, mask, preferred=ctx.backend), None, None, None


def _restore_setup(ctx, inputs, output):
    visible, masked, mask, backend = inputs
    ctx.save_for_backward(mask)
    ctx.n_masked = masked.shape[1]
    ctx.backend = backend


def _restore_backward(ctx, grad):
    (mask,) = ctx.saved_tensors
    grad_visible, grad_masked = _call_split(grad, mask, ctx.n_masked, preferred=ctx.backend)
    return grad_visible, grad_masked, None, None


torch.library.register_autograd("enat::split_tokens", _split_backward, setup_context=_split_setup)
torch.library.register_autograd("enat::restore_tokens", _restore_backward, setup_context=_restore_setup)


def split_tokens(x, mask, n_masked=None, *, backend=None):
    """Split x (B, L, D) by mask (B, L) bool (True = masked) -> (visible (B, L-n, D), masked (B, n, D)).

    Rows keep ascending position order. n_masked: True entries per row; give it to avoid a host sync.
    """
    if n_masked is None:
        checks.mask("mask", mask)
        n_masked = checks.uniform_row_count("mask", mask)
    return _SPLIT(x, mask, n_masked, backend=backend)


def restore_tokens(visible, masked, mask, *, backend=None):
    """Inverse of split_tokens: visible (B, L-n, D) and masked (B, n, D) back into (B, L, D) by mask (B, L)."""
    return _RESTORE(visible, masked, mask, backend=backend)


def _check_split(x, mask, n_masked):
    checks.tensor("x", x, "B L D")
    checks.mask("mask", mask, "x", x)
    checks.count("n_masked", n_masked, mask.shape[1], "L = mask.shape[1]")
    return x, mask, n_masked


def _check_restore(visible, masked, mask):
    checks.tensor("visible", visible, "B L-n D")
    checks.tensor("masked", masked, "B n D")
    checks.tensor("mask", mask, "B L")
    checks.dtype_in("mask", mask, (torch.bool,))
    checks.same_device(visible=visible, masked=masked, mask=mask)
    checks.same_dtype(visible=visible, masked=masked)
    checks.size_equal("visible", visible, 0, "mask", mask, 0)
    checks.size_equal("masked", masked, 0, "mask", mask, 0)
    checks.size_equal("masked", masked, 2, "visible", visible, 2)
    if visible.shape[1] + masked.shape[1] != mask.shape[1]:
        raise ValueError(
            "visible.shape[1] + masked.shape[1] must equal mask.shape[1] (L); got "
            f"visible: {checks.describe(visible)}, masked: {checks.describe(masked)}, mask: {checks.describe(mask)}"
        )
    return visible, masked, mask


_SPLIT = Entry(SPLIT, _check_split)
_RESTORE = Entry(RESTORE, _check_restore)

"""split_tokens and restore_tokens: split a sequence (B, L, D) by a (B, L) bool mask into its visible
rows (B, L-n, D) and masked rows (B, n, D), both in ascending position order, and put them back.

Each is the other's backward. Every row of the mask has the same number n of True (masked) entries;
checked for CPU tensors, and for CUDA tensors with ENAT_KERNELS_DEBUG=1.
"""

import torch

from .. import triton_utils
from .._library import register_cuda_fake, register_router
from ..backends import Dispatcher
from . import _checks
from .gather_scatter import _rows, cuda_why_not, gather_tokens_reference, triton_why_not
from .mask_to_index import TRITON_MAX_L, mask_to_index_reference

triton, tl = triton_utils.triton, triton_utils.tl


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


# Triton: one launch over (row b, tile of BLOCK_L positions). A program counts the masked positions
# before its tile (a sum over the mask row), takes a prefix sum within the tile, and so knows every
# position's rank among the masked or the visible rows; then it moves the rows. Writes and reads are
# guarded so that a row with the wrong number of masked entries never goes out of bounds.

if triton is not None:

    @triton.autotune(
        configs=triton_utils.autotune_configs(
            [
                triton.Config({"BLOCK_L": 4, "BLOCK_D": 256}, num_warps=4),
                triton.Config({"BLOCK_L": 2, "BLOCK_D": 512}, num_warps=4),
                triton.Config({"BLOCK_L": 8, "BLOCK_D": 128}, num_warps=4),
                triton.Config({"BLOCK_L": 16, "BLOCK_D": 128}, num_warps=4),
            ]
        ),
        key=["D", "SPLIT"],
    )
    @triton.jit
    def _split_restore_kernel(
        x_ptr, mask_ptr, visible_ptr, masked_ptr, L, n_masked, D,
        sx_b, sx_l, sx_d, sm_b, sm_l, sv_b, sv_n, sv_d, sk_b, sk_n, sk_d,
        SPLIT: tl.constexpr, BLOCK_ROW: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """SPLIT: x -> (visible, masked); else (visible, masked) -> x, by the mask row."""
        pid = tl.program_id(0)
        tiles_per_row = tl.cdiv(L, BLOCK_L)
        b = (pid // tiles_per_row).to(tl.int64)
        start = (pid % tiles_per_row) * BLOCK_L
        mask_row = mask_ptr + b * sm_b
        everything = tl.arange(0, BLOCK_ROW)
        before = tl.sum(tl.load(mask_row + everything.to(tl.int64) * sm_l, mask=everything < start, other=0).to(tl.int32), 0)
        pos = start + tl.arange(0, BLOCK_L)
        pos_ok = pos < L
        is_masked = tl.load(mask_row + pos.to(tl.int64) * sm_l, mask=pos_ok, other=0).to(tl.int32)
        masked_up_to = before + tl.cumsum(is_masked, 0)  # masked positions in [0, pos]
        masked_rank = masked_up_to - 1
        visible_rank = pos - masked_up_to
        to_masked = pos_ok & (is_masked > 0) & (masked_rank < n_masked)
        to_visible = pos_ok & (is_masked == 0) & (visible_rank < L - n_masked)
        x_rows = x_ptr + b * sx_b + pos[:, None].to(tl.int64) * sx_l
        k_rows = masked_ptr + b * sk_b + masked_rank[:, None].to(tl.int64) * sk_n
        v_rows = visible_ptr + b * sv_b + visible_rank[:, None].to(tl.int64) * sv_n
        for d0 in range(0, D, BLOCK_D):
            cols = (d0 + tl.arange(0, BLOCK_D)).to(tl.int64)
            d_ok = cols[None, :] < D
            mk = to_masked[:, None] & d_ok
            mv = to_visible[:, None] & d_ok
            if SPLIT:
                value = tl.load(x_rows + cols[None, :] * sx_d, mask=pos_ok[:, None] & d_ok)
                tl.store(k_rows + cols[None, :] * sk_d, value, mask=mk)
                tl.store(v_rows + cols[None, :] * sv_d, value, mask=mv)
            else:
                value = tl.zeros([BLOCK_L, BLOCK_D], x_ptr.dtype.element_ty)
                value = tl.load(k_rows + cols[None, :] * sk_d, mask=mk, other=value)
                value = tl.load(v_rows + cols[None, :] * sv_d, mask=mv, other=value)
                tl.store(x_rows + cols[None, :] * sx_d, value, mask=pos_ok[:, None] & d_ok)


def _split_restore_triton(x, mask, visible, masked, split):
    B, L, D = x.shape
    if x.numel() == 0:
        return

    def grid(meta):
        return (B * triton.cdiv(L, meta["BLOCK_L"]),)

    as_bytes = mask.view(torch.uint8)
    _split_restore_kernel[grid](
        x, as_bytes, visible, masked, L, masked.shape[1], D,
        *x.stride(), *as_bytes.stride(), *visible.stride(), *masked.stride(),
        SPLIT=split, BLOCK_ROW=max(16, triton.next_power_of_2(L)),
    )


def split_tokens_triton(x, mask, n_masked):
    B, L, D = x.shape
    visible, masked = x.new_empty((B, L - n_masked, D)), x.new_empty((B, n_masked, D))
    _split_restore_triton(x, mask, visible, masked, split=True)
    return visible, masked


def restore_tokens_triton(visible, masked, mask):
    B, L = mask.shape
    out = visible.new_empty((B, L, visible.shape[2]))
    _split_restore_triton(out, mask, visible, masked, split=False)
    return out


def _row_limit(mask):
    L = mask.shape[1]
    return [f"rows of {L} positions are above the Triton kernel's {TRITON_MAX_L}"] if L > TRITON_MAX_L else []


SPLIT = Dispatcher("split_tokens")
SPLIT.register("reference", split_tokens_reference)
SPLIT.register("triton", split_tokens_triton, lambda x, mask, n: triton_why_not(x=x) + _row_limit(mask))
SPLIT.register("cuda", lambda *a: torch.ops.enat.split_tokens_cuda(*a), lambda x, mask, n: cuda_why_not(x=x))

RESTORE = Dispatcher("restore_tokens")
RESTORE.register("reference", restore_tokens_reference)
RESTORE.register("triton", restore_tokens_triton,
                 lambda visible, masked, mask: triton_why_not(visible=visible, masked=masked) + _row_limit(mask))
RESTORE.register("cuda", lambda *a: torch.ops.enat.restore_tokens_cuda(*a),
                 lambda visible, masked, mask: cuda_why_not(visible=visible, masked=masked))


def _split_router(x, mask, n_masked, backend):
    _checks.mask_counts("mask", mask, "n_masked", n_masked)
    return SPLIT.run(backend, x.device, x, mask, n_masked)


def _restore_router(visible, masked, mask, backend):
    _checks.mask_counts("mask", mask, "masked.shape[1]", masked.shape[1])
    return RESTORE.run(backend, visible.device, visible, masked, mask)


register_router("split_tokens", _split_router)
register_router("restore_tokens", _restore_router)


def _split_fake(x, mask, n_masked, backend=None):
    B, L, D = x.shape
    return x.new_empty((B, L - n_masked, D)), x.new_empty((B, n_masked, D))


def _restore_fake(visible, masked, mask, backend=None):
    return visible.new_empty((mask.shape[0], mask.shape[1], visible.shape[2]))


torch.library.register_fake("enat::split_tokens")(_split_fake)
torch.library.register_fake("enat::restore_tokens")(_restore_fake)
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
    _checks.tensor("x", x, "B L D")
    _checks.mask("mask", mask, "x", x)
    if n_masked is None:
        n_masked = _checks.uniform_row_count("mask", mask)
    else:
        _checks.count("n_masked", n_masked, mask.shape[1], "L = mask.shape[1]")
    return _call_split(x, mask, n_masked, backend)


def restore_tokens(visible, masked, mask, *, backend=None):
    """Inverse of split_tokens: visible (B, L-n, D) and masked (B, n, D) back into (B, L, D) by mask (B, L)."""
    _checks.tensor("visible", visible, "B L-n D")
    _checks.tensor("masked", masked, "B n D")
    _checks.tensor("mask", mask, "B L")
    _checks.dtype_in("mask", mask, (torch.bool,))
    _checks.same_device(visible=visible, masked=masked, mask=mask)
    _checks.same_dtype(visible=visible, masked=masked)
    _checks.size_equal("visible", visible, 0, "mask", mask, 0)
    _checks.size_equal("masked", masked, 0, "mask", mask, 0)
    _checks.size_equal("masked", masked, 2, "visible", visible, 2)
    if visible.shape[1] + masked.shape[1] != mask.shape[1]:
        raise ValueError(
            "visible.shape[1] + masked.shape[1] must equal mask.shape[1] (L); got "
            f"visible: {_checks.describe(visible)}, masked: {_checks.describe(masked)}, mask: {_checks.describe(mask)}"
        )
    return _call_restore(visible, masked, mask, backend)

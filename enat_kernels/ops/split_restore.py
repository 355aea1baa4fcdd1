"""split_tokens and restore_tokens: split a sequence (B, L, D) by a (B, L) bool mask into its visible
rows (B, L-n, D) and masked rows (B, n, D), both in ascending position order, and put them back.

Each is the other's backward. Every row of the mask has the same number n of True (masked) entries;
checked for CPU tensors, and for CUDA tensors with ENAT_KERNELS_DEBUG=1.
"""

import torch

from .._library import register_router
from ..backends import Dispatcher
from . import _checks
from .gather_scatter import _rows, gather_tokens_reference
from .mask_to_index import mask_to_index_reference


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


SPLIT = Dispatcher("split_tokens")
SPLIT.register("reference", split_tokens_reference)

RESTORE = Dispatcher("restore_tokens")
RESTORE.register("reference", restore_tokens_reference)


def _split_router(x, mask, n_masked, backend):
    _checks.mask_counts("mask", mask, "n_masked", n_masked)
    return SPLIT.run(backend, x.device, x, mask, n_masked)


def _restore_router(visible, masked, mask, backend):
    _checks.mask_counts("mask", mask, "masked.shape[1]", masked.shape[1])
    return RESTORE.run(backend, visible.device, visible, masked, mask)


register_router("split_tokens", _split_router)
register_router("restore_tokens", _restore_router)


@torch.library.register_fake("enat::split_tokens")
def _split_fake(x, mask, n_masked, backend):
    B, L, D = x.shape
    return x.new_empty((B, L - n_masked, D)), x.new_empty((B, n_masked, D))


@torch.library.register_fake("enat::restore_tokens")
def _restore_fake(visible, masked, mask, backend):
    return visible.new_empty((mask.shape[0], mask.shape[1], visible.shape[2]))


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

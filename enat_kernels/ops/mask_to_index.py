"""mask_to_index: ascending positions of the True entries of a (B, L) bool mask, as (B, count) int64.

With count given there is no host sync (the shape is known); without it the count is read once
from the mask, and rows with different counts raise. With count given, every row must have exactly
count True entries: checked for CPU tensors, and for CUDA tensors with ENAT_KERNELS_DEBUG=1.
"""

import torch

from .._library import register_router
from ..backends import Dispatcher
from . import _checks


def mask_to_index_reference(mask, count):
    # A stable sort on "not masked" keeps the True positions first, in ascending order.
    order = torch.argsort((~mask).to(torch.uint8), dim=1, stable=True)
    return order[:, :count].contiguous()


MASK_TO_INDEX = Dispatcher("mask_to_index")
MASK_TO_INDEX.register("reference", mask_to_index_reference)


def _router(mask, count, backend):
    _checks.mask_counts("mask", mask, "count", count)
    return MASK_TO_INDEX.run(backend, mask.device, mask, count)


register_router("mask_to_index", _router)


@torch.library.register_fake("enat::mask_to_index")
def _fake(mask, count, backend):
    return mask.new_empty((mask.shape[0], count), dtype=torch.int64)


def mask_to_index(mask, count=None, *, backend=None):
    """Positions where mask (B, L) bool is True -> (B, count) int64, ascending in each row.

    count: True entries per row. Give it to avoid a host sync (and under torch.compile).
    """
    _checks.mask("mask", mask)
    if count is None:
        count = _checks.uniform_row_count("mask", mask)
    else:
        _checks.count("count", count, mask.shape[1], "L = mask.shape[1]")
    chosen = MASK_TO_INDEX.select(backend, mask.device, mask, count)
    return torch.ops.enat.mask_to_index(mask, count, chosen)

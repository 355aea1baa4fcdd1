"""mask_to_index: ascending positions of the True entries of a (B, L) bool mask, as (B, count) int64.

With count given there is no host sync (the shape is known); without it the count is read once
from the mask, and rows with different counts raise. With count given, every row must have exactly
count True entries: checked for CPU tensors, and for CUDA tensors with ENAT_KERNELS_DEBUG=1.
"""

import torch

from .. import checks, triton_utils
from .._library import define, register_cuda_fake
from ..backends import Dispatcher, Entry

triton, tl = triton_utils.triton, triton_utils.tl


def mask_to_index_reference(mask, count):
    # A stable sort on "not masked" keeps the True positions first, in ascending order.
    order = torch.argsort((~mask).to(torch.uint8), dim=1, stable=True)
    return order[:, :count].contiguous()


# Triton: one program per row; the rank of each True entry is a running prefix sum over the row, taken
# 2048 positions at a time (so that the registers do not grow with L), and the entry is written to that
# slot. Slots past the row's True count (a broken precondition) get L.

TRITON_MAX_L = 1 << 16

if triton is not None:

    @triton.jit
    def _mask_to_index_kernel(mask_ptr, out_ptr, L, count, sm_b, sm_l, so_b, BLOCK_L: tl.constexpr):
        CHUNK: tl.constexpr = BLOCK_L if BLOCK_L < 2048 else 2048
        b = tl.program_id(0).to(tl.int64)
        out_row = out_ptr + b * so_b
        total = 0
        for start in range(0, L, CHUNK):
            pos = start + tl.arange(0, CHUNK)
            ok = pos < L
            m = tl.load(mask_ptr + b * sm_b + pos.to(tl.int64) * sm_l, mask=ok, other=0).to(tl.int32)
            rank = total + tl.cumsum(m, 0) - 1
            tl.store(out_row + rank, pos.to(tl.int64), mask=ok & (m > 0) & (rank < count))
            total += tl.sum(m, 0)
        for start in range(total, count, CHUNK):
            slot = start + tl.arange(0, CHUNK)
            tl.store(out_row + slot, tl.zeros([CHUNK], tl.int64) + L, mask=slot < count)


def mask_to_index_triton(mask, count):
    B, L = mask.shape
    out = torch.empty((B, count), dtype=torch.int64, device=mask.device)
    if out.numel() == 0:
        return out
    as_bytes = mask.view(torch.uint8)
    _mask_to_index_kernel[(B,)](as_bytes, out, L, count, *as_bytes.stride(), out.stride(0),
                                BLOCK_L=max(16, triton.next_power_of_2(L)))
    return out


def _triton_why_not(mask, count):
    L = mask.shape[1]
    return [f"rows of {L} positions are above the Triton kernel's {TRITON_MAX_L}"] if L > TRITON_MAX_L else []


MASK_TO_INDEX = Dispatcher("mask_to_index", values=lambda mask, count: checks.mask_counts("mask", mask, "count", count))
MASK_TO_INDEX.register("reference", mask_to_index_reference)
MASK_TO_INDEX.register("triton", mask_to_index_triton, _triton_why_not)
MASK_TO_INDEX.register("cuda", lambda mask, count: torch.ops.enat.mask_to_index_cuda(mask, count))


def _router(mask, count, backend):
    return MASK_TO_INDEX.run(backend, mask.device, mask, count)


def _fake(mask, count, backend=None):
    return mask.new_empty((mask.shape[0], count), dtype=torch.int64)


define("mask_to_index(Tensor mask, SymInt count, str backend) -> Tensor", _router, _fake)
register_cuda_fake("mask_to_index_cuda", _fake)


def mask_to_index(mask, count=None, *, backend=None):
    """Positions where mask (B, L) bool is True -> (B, count) int64, ascending in each row.

    count: True entries per row. Give it to avoid a host sync (and under torch.compile).
    """
    if count is None:
        checks.mask("mask", mask)
        count = checks.uniform_row_count("mask", mask)
    return _MASK_TO_INDEX(mask, count, backend=backend)


def _check(mask, count):
    checks.mask("mask", mask)
    checks.count("count", count, mask.shape[1], "L = mask.shape[1]")
    return mask, count


_MASK_TO_INDEX = Entry(MASK_TO_INDEX, _check)

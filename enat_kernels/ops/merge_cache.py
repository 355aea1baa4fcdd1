"""merge_cache: the union of two position-indexed row sets, in ascending position order.

After a reuse step, ENAT's visible set is the freshly encoded critical tokens fresh (B, nf, D) at
fresh_index (B, nf) together with the projected cached tokens cached (B, nc, D) at cached_index
(B, nc). The result is (B, nf + nc, D). Each row of a set lands at its rank in the union:
fresh row j goes to j + #{cached positions below fresh_index[j]}, and likewise for cached rows.

Precondition: both index tensors hold ascending positions and the two sets are disjoint; checked
for CPU tensors, and for CUDA tensors with ENAT_KERNELS_DEBUG=1.
"""

import torch

from .._library import register_router
from ..backends import Dispatcher
from . import _checks
from .gather_scatter import _call_gather


def merge_cache_reference(fresh, fresh_index, cached, cached_index):
    order = torch.argsort(torch.cat([fresh_index, cached_index], dim=1), dim=1, stable=True)
    rows = torch.cat([fresh, cached], dim=1)
    return torch.gather(rows, 1, order.unsqueeze(-1).expand(-1, -1, rows.shape[2]))


def union_ranks(index, other_index):
    """Rank in the union of each position of `index` (B, n), given the disjoint `other_index` (B, m)."""
    below = torch.searchsorted(other_index.contiguous(), index.contiguous())
    return below + torch.arange(index.shape[1], device=index.device)


MERGE = Dispatcher("merge_cache")
MERGE.register("reference", merge_cache_reference)


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


register_router("merge_cache", _router)


@torch.library.register_fake("enat::merge_cache")
def _fake(fresh, fresh_index, cached, cached_index, backend):
    return fresh.new_empty((fresh.shape[0], fresh.shape[1] + cached.shape[1], fresh.shape[2]))


def _setup(ctx, inputs, output):
    fresh, fresh_index, cached, cached_index, backend = inputs
    ctx.save_for_backward(fresh_index, cached_index)
    ctx.backend = backend


def _backward(ctx, grad):
    fresh_index, cached_index = ctx.saved_tensors
    grad_fresh = grad_cached = None
    if ctx.needs_input_grad[0]:
        grad_fresh = _call_gather(grad, union_ranks(fresh_index, cached_index), preferred=ctx.backend)
    if ctx.needs_input_grad[2]:
        grad_cached = _call_gather(grad, union_ranks(cached_index, fresh_index), preferred=ctx.backend)
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

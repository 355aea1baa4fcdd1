"""gather_tokens, scatter_tokens, scatter_tokens_: move token rows between a full sequence
x (B, L, D) and a packed set (B, n, D), given positions index (B, n).

Precondition: index is int64 with ascending, hence unique, positions in [0, L) in each row (what
mask_to_index returns). Because rows are unique, the backward of a gather is a scatter into zeros
and the backward of a scatter is a gather plus a copy with those rows zeroed, with no atomics. The
values are checked for CPU tensors, and for CUDA tensors with ENAT_KERNELS_DEBUG=1 (a host sync);
the fast path does not check them.

Triton: each op is one launch of one of two kernels, with the tiles and configs of _tiles.py
(BLOCK_N rows of D elements per program, no loop over D). gather and the in-place scatter copy
BLOCK_N of the B * n (row, index entry) pairs: the index is read once per program, the rows move
as one tile. The out-of-place scatters (and the two backward ops) write every output row once, a
tile of BLOCK_N positions per program: one search of the index row finds the entries at or above
the tile's first position, and the BLOCK_N entries from there tell each position whether it is
replaced and by which src row (a [BLOCK_N, BLOCK_N] comparison, no search per row).
"""

import torch

from .. import checks
from .._library import define, register_cuda_fake
from ..backends import Dispatcher, Entry
from . import _tiles
from ._tiles import TRITON_DTYPES, cuda_why_not, triton_why_not  # noqa: F401  (the token ops' limits)

triton, tl = _tiles.triton, _tiles.tl

# Reference (plain PyTorch).


def _rows(index, D):
    return index.unsqueeze(-1).expand(-1, -1, D)


def gather_tokens_reference(x, index):
    return torch.gather(x, 1, _rows(index, x.shape[2]))


def scatter_tokens_reference(base, index, src):
    out = base.clone(memory_format=torch.contiguous_format)
    out.scatter_(1, _rows(index, base.shape[2]), src)
    return out


def scatter_tokens_inplace_reference(base, index, src):
    base.scatter_(1, _rows(index, base.shape[2]), src)


def scatter_into_zeros_reference(index, src, L):
    out = src.new_zeros((src.shape[0], L, src.shape[2]))
    out.scatter_(1, _rows(index, src.shape[2]), src)
    return out


def zero_rows_reference(x, index):
    out = x.clone(memory_format=torch.contiguous_format)
    out.scatter_(1, _rows(index, x.shape[2]), 0)
    return out


# Triton.

if triton is not None:

    @_tiles.jit_tiles("src_ptr", "SRC_INDEXED")
    def _copy_rows_kernel(
        src_ptr, dst_ptr, index_ptr, n, rows, D, rows_key,
        src_stride_b, src_stride_l, src_stride_d, dst_stride_b, dst_stride_l, dst_stride_d,
        index_stride_b, index_stride_n,
        SRC_INDEXED: tl.constexpr, TILE_BYTES: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        EVEN_D: tl.constexpr,
    ):
        """dst[b, r_dst(j)] = src[b, r_src(j)] for BLOCK_N of the rows = B * n pairs (b, j), with
        r(j) = index[b, j] on the indexed side and j on the other."""
        pair = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        ok = pair < rows
        b = pair // n
        j = pair - b * n
        position = tl.load(index_ptr + b * index_stride_b + j * index_stride_n, mask=ok, other=0)
        src_row = position if SRC_INDEXED else j
        dst_row = j if SRC_INDEXED else position
        columns = _tiles.row_tile_columns(BLOCK_D)
        m = _tiles.tile_mask(ok, columns, D, EVEN_D)
        src = src_ptr + (b * src_stride_b + src_row * src_stride_l)[:, None] + columns[None, :] * src_stride_d
        dst = dst_ptr + (b * dst_stride_b + dst_row * dst_stride_l)[:, None] + columns[None, :] * dst_stride_d
        tl.store(dst, tl.load(src, mask=m, eviction_policy="evict_first"), mask=m)

    @_tiles.jit_tiles("out_ptr", "HAS_BASE", "HAS_SRC")
    def _scatter_rows_kernel(
        base_ptr, src_ptr, index_ptr, out_ptr, L, n, D, rows_key, rounds,
        base_stride_b, base_stride_l, base_stride_d, src_stride_b, src_stride_n, src_stride_d,
        index_stride_b, index_stride_n, out_stride_b, out_stride_l,
        HAS_BASE: tl.constexpr, HAS_SRC: tl.constexpr, TILE_BYTES: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, PROBES: tl.constexpr,
    ):
        """out[b, l] = src[b, j] where index[b, j] == l, else base[b, l] (zeros for a missing base or
        src), for the BLOCK_N positions l0 <= l < l0 + BLOCK_N of one row b."""
        tiles = tl.cdiv(L, BLOCK_N)
        b = (tl.program_id(0) // tiles).to(tl.int64)
        l0 = (tl.program_id(0) % tiles) * BLOCK_N
        index_row = index_ptr + b * index_stride_b
        # first = #(entries < l0): at least l0 - (L - n) (the positions missing from the index), at most
        # min(l0, n). The entries of the tile are among the BLOCK_N from there on.
        first = _tiles.search(index_row, index_stride_n, tl.maximum(l0 - (L - n), 0), tl.minimum(l0, n), l0,
                              index_row, 0, 0, rounds, MERGE_PATH=False, PROBES=PROBES)
        k = tl.arange(0, BLOCK_N)
        entry = tl.load(index_row + (first + k).to(tl.int64) * index_stride_n, mask=first + k < n, other=L,
                        eviction_policy="evict_last")
        pos = l0 + k
        pos_ok = pos < L
        hit = tl.sum((entry[None, :] == pos[:, None]).to(tl.int32), 1) > 0
        j = first + tl.sum((entry[None, :] < pos[:, None]).to(tl.int32), 1)  # < n where hit
        columns = _tiles.row_tile_columns(BLOCK_D)
        rows = pos.to(tl.int64)
        value = tl.zeros([BLOCK_N, BLOCK_D], out_ptr.dtype.element_ty)
        if HAS_SRC:
            src_rows = b * src_stride_b + j.to(tl.int64) * src_stride_n
            src = src_ptr + src_rows[:, None] + columns[None, :] * src_stride_d
            value = tl.load(src, mask=_tiles.tile_mask(pos_ok & hit, columns, D, EVEN_D), other=value,
                            eviction_policy="evict_first")
        if HAS_BASE:
            base_rows = b * base_stride_b + rows * base_stride_l
            base = base_ptr + base_rows[:, None] + columns[None, :] * base_stride_d
            value = tl.load(base, mask=_tiles.tile_mask(pos_ok & ~hit, columns, D, EVEN_D), other=value,
                            eviction_policy="evict_first")
        out = out_ptr + (b * out_stride_b + rows * out_stride_l)[:, None] + columns[None, :]
        tl.store(out, value, mask=_tiles.tile_mask(pos_ok, columns, D, EVEN_D))


def _copy_rows_triton(src, dst, index, src_indexed, config):
    """Gather (src_indexed) or scatter rows between src and dst along dim 1 at index (B, n)."""
    B, n = index.shape
    D = dst.shape[2]
    if B == 0 or n == 0 or D == 0:
        return
    args = (src, dst, index, n, B * n, D, _tiles.rows_bucket(B * n), *src.stride(), *dst.stride(), *index.stride())
    _tiles.launch(_copy_rows_kernel, 1, B * n, D, args, dict(SRC_INDEXED=src_indexed), config)


def _scatter_rows_triton(base, index, src, L, like, config):
    """A new contiguous (B, L, D) from base (B, L, D) (or zeros) with the rows at index (B, n) from
    src (B, n, D) (or zeros)."""
    B, n = index.shape
    D = like.shape[2]
    out = like.new_empty((B, L, D))
    if out.numel() == 0:
        return out
    unused = (0, 0, 0)
    args = (out if base is None else base, out if src is None else src, index, out, L, n, D,
            _tiles.rows_bucket(L), _tiles.search_rounds(min(n, L - n)),
            *(unused if base is None else base.stride()), *(unused if src is None else src.stride()),
            *index.stride(), out.stride(0), out.stride(1))
    meta = dict(HAS_BASE=base is not None, HAS_SRC=src is not None, PROBES=_tiles.SEARCH_PROBES)
    _tiles.launch(_scatter_rows_kernel, B, L, D, args, meta, config)
    return out


def gather_tokens_triton(x, index, *, config=None):
    """x (B, L, D), index (B, n) -> (B, n, D). `config` (a triton.Config) bypasses autotuning."""
    out = x.new_empty((x.shape[0], index.shape[1], x.shape[2]))
    _copy_rows_triton(x, out, index, True, config)
    return out


def scatter_tokens_inplace_triton(base, index, src, *, config=None):
    """base (B, L, D) at index (B, n) <- src (B, n, D), in place."""
    _copy_rows_triton(src, base, index, False, config)


def scatter_tokens_triton(base, index, src, *, config=None):
    """base (B, L, D), index (B, n), src (B, n, D) -> (B, L, D)."""
    return _scatter_rows_triton(base, index, src, base.shape[1], base, config)


def scatter_into_zeros_triton(index, src, L, *, config=None):
    """index (B, n), src (B, n, D) -> (B, L, D), zeros off the index."""
    return _scatter_rows_triton(None, index, src, L, src, config)


def zero_rows_triton(x, index, *, config=None):
    """x (B, L, D), index (B, n) -> (B, L, D) with the rows at index zeroed."""
    return _scatter_rows_triton(x, index, None, x.shape[1], x, config)


# Dispatch, registration, autograd.

def _index_values(x, index, *rest):
    """Value check of the (x, index, ...) ops: index holds ascending positions in [0, x.shape[1])."""
    checks.index_values("index", index, x.shape[1])


GATHER = Dispatcher("gather_tokens", values=_index_values)
GATHER.register("reference", gather_tokens_reference)
GATHER.register("triton", gather_tokens_triton, lambda x, index: triton_why_not(x=x))
GATHER.register("cuda", lambda x, index: torch.ops.enat.gather_tokens_cuda(x, index), lambda x, index: cuda_why_not(x=x))

SCATTER = Dispatcher("scatter_tokens", values=_index_values)
SCATTER.register("reference", scatter_tokens_reference)
SCATTER.register("triton", scatter_tokens_triton, lambda base, index, src: triton_why_not(base=base, src=src))
SCATTER.register("cuda", lambda base, index, src: torch.ops.enat.scatter_tokens_cuda(base, index, src),
                 lambda base, index, src: cuda_why_not(base=base, src=src))

SCATTER_ = Dispatcher("scatter_tokens_", values=_index_values)
SCATTER_.register("reference", scatter_tokens_inplace_reference)
SCATTER_.register("triton", scatter_tokens_inplace_triton, lambda base, index, src: triton_why_not(base=base, src=src))
SCATTER_.register("cuda", lambda base, index, src: torch.ops.enat.scatter_tokens_inplace_cuda(base, index, src),
                  lambda base, index, src: cuda_why_not(base=base, src=src))

# The two backward-only ops: gather's gradient (scatter into zeros) and scatter's base gradient.
SCATTER_ZEROS = Dispatcher("scatter_into_zeros", values=lambda index, src, L: checks.index_values("index", index, L))
SCATTER_ZEROS.register("reference", scatter_into_zeros_reference)
SCATTER_ZEROS.register("triton", scatter_into_zeros_triton, lambda index, src, L: triton_why_not(src=src))
SCATTER_ZEROS.register("cuda", lambda index, src, L: torch.ops.enat.scatter_into_zeros_cuda(index, src, L),
                       lambda index, src, L: cuda_why_not(src=src))

ZERO_ROWS = Dispatcher("zero_rows", values=_index_values)
ZERO_ROWS.register("reference", zero_rows_reference)
ZERO_ROWS.register("triton", zero_rows_triton, lambda x, index: triton_why_not(x=x))
ZERO_ROWS.register("cuda", lambda x, index: torch.ops.enat.zero_rows_cuda(x, index), lambda x, index: cuda_why_not(x=x))


def _gather_router(x, index, backend):
    return GATHER.run(backend, x.device, x, index)


def _scatter_router(base, index, src, backend):
    return SCATTER.run(backend, base.device, base, index, src)


def _scatter_inplace_router(base, index, src, backend):
    SCATTER_.run(backend, base.device, base, index, src)


def _scatter_zeros_router(index, src, L, backend):
    return SCATTER_ZEROS.run(backend, src.device, index, src, L)


def _zero_rows_router(x, index, backend):
    return ZERO_ROWS.run(backend, x.device, x, index)


def _gather_fake(x, index, backend=None):
    return x.new_empty((x.shape[0], index.shape[1], x.shape[2]))


def _scatter_fake(base, index, src, backend=None):
    return torch.empty_like(base, memory_format=torch.contiguous_format)


def _scatter_inplace_fake(base, index, src, backend=None):
    return None


def _scatter_zeros_fake(index, src, L, backend=None):
    return src.new_empty((src.shape[0], L, src.shape[2]))


def _zero_rows_fake(x, index, backend=None):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


define("gather_tokens(Tensor x, Tensor index, str backend) -> Tensor", _gather_router, _gather_fake)
define("scatter_tokens(Tensor base, Tensor index, Tensor src, str backend) -> Tensor", _scatter_router, _scatter_fake)
define("scatter_tokens_(Tensor(a!) base, Tensor index, Tensor src, str backend) -> ()", _scatter_inplace_router,
       _scatter_inplace_fake)
# The two backward-only ops, one launch each.
define("scatter_into_zeros(Tensor index, Tensor src, SymInt L, str backend) -> Tensor", _scatter_zeros_router,
       _scatter_zeros_fake)
define("zero_rows(Tensor x, Tensor index, str backend) -> Tensor", _zero_rows_router, _zero_rows_fake)
register_cuda_fake("gather_tokens_cuda", _gather_fake)
register_cuda_fake("scatter_tokens_cuda", _scatter_fake)
register_cuda_fake("scatter_tokens_inplace_cuda", _scatter_inplace_fake)
register_cuda_fake("scatter_into_zeros_cuda", _scatter_zeros_fake)
register_cuda_fake("zero_rows_cuda", _zero_rows_fake)


def call_gather(x, index, backend=None, preferred=None):
    chosen = GATHER.select(backend, x.device, x, index, preferred=preferred)
    return torch.ops.enat.gather_tokens(x, index, chosen)


def _gather_setup(ctx, inputs, output):
    x, index, backend = inputs
    ctx.save_for_backward(index)
    ctx.L = x.shape[1]
    ctx.backend = backend


def _gather_backward(ctx, grad):
    (index,) = ctx.saved_tensors
    chosen = SCATTER_ZEROS.select(None, grad.device, index, grad, ctx.L, preferred=ctx.backend)
    return torch.ops.enat.scatter_into_zeros(index, grad, ctx.L, chosen), None, None


def _scatter_setup(ctx, inputs, output):
    base, index, src, backend = inputs
    ctx.save_for_backward(index)
    ctx.backend = backend


def _scatter_backward(ctx, grad):
    (index,) = ctx.saved_tensors
    grad_base = grad_src = None
    if ctx.needs_input_grad[0]:
        chosen = ZERO_ROWS.select(None, grad.device, grad, index, preferred=ctx.backend)
        grad_base = torch.ops.enat.zero_rows(grad, index, chosen)
    if ctx.needs_input_grad[2]:
        grad_src = call_gather(grad, index, preferred=ctx.backend)
    return grad_base, None, grad_src, None


torch.library.register_autograd("enat::gather_tokens", _gather_backward, setup_context=_gather_setup)
torch.library.register_autograd("enat::scatter_tokens", _scatter_backward, setup_context=_scatter_setup)


# Public API.


def _check_gather(x, index):
    checks.tensor("x", x, "B L D")
    checks.index("index", index, "x", x)
    return x, index


def _check_scatter(base, index, src):
    checks.tensor("base", base, "B L D")
    checks.index("index", index, "base", base)
    checks.tensor("src", src, "B n D")
    checks.same_device(base=base, src=src)
    checks.same_dtype(base=base, src=src)
    checks.size_equal("src", src, 0, "base", base, 0)
    checks.size_equal("src", src, 1, "index", index, 1)
    checks.size_equal("src", src, 2, "base", base, 2)
    return base, index, src


def _check_scatter_inplace(base, index, src):
    _check_scatter(base, index, src)
    if any(stride == 0 and size > 1 for stride, size in zip(base.stride(), base.shape)):
        raise ValueError(f"base must not be an expanded view (strides {base.stride()}): rows would alias ({checks.describe(base)})")
    return base, index, src


_GATHER = Entry(GATHER, _check_gather)
_SCATTER = Entry(SCATTER, _check_scatter)
_SCATTER_ = Entry(SCATTER_, _check_scatter_inplace)


def gather_tokens(x, index, *, backend=None):
    """Rows of x at index: x (B, L, D), index (B, n) int64 ascending positions -> (B, n, D)."""
    return _GATHER(x, index, backend=backend)


def scatter_tokens(base, index, src, *, backend=None):
    """Copy of base (B, L, D) with the rows at index (B, n) replaced by src (B, n, D)."""
    return _SCATTER(base, index, src, backend=backend)


def scatter_tokens_(base, index, src, *, backend=None):
    """In-place scatter_tokens: writes src (B, n, D) into base (B, L, D) at index (B, n); returns base.

    Not differentiable (use scatter_tokens under autograd).
    """
    if torch.is_grad_enabled() and (getattr(base, "requires_grad", False) or getattr(src, "requires_grad", False)):
        raise ValueError("scatter_tokens_ is not differentiable (base or src requires grad); use scatter_tokens")
    _SCATTER_(base, index, src, backend=backend)
    return base

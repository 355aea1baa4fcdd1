"""GPU-only checks of the CUDA token-movement kernels' own code paths (csrc/cuda/tokens.cu,
gather_tokens.cu, rows.cuh), calling torch.ops.enat.*_cuda directly against the plain-PyTorch
references with torch.equal.

What the shapes aim at (see the design comment at the top of csrc/cuda/token_kernels.cuh): every
chunk width (16, 8, 4, 2, 1 bytes) with 1 to 32 lanes per row and rows longer than one pass of a warp; batch x rows far
beyond the grid, so that persistent blocks take many tiles and split/restore carry mask counts
across tiles and batch rows; the model's sizes (D = 1024 and 4096 in fp16 / bf16); n = 0 and n = L;
strided and offset views (narrower chunks); masks and index rows that break the contract.
tests/test_tokens.py covers the ops through the public API on every backend, tests/test_token_kernels.py
the Triton launchers and the GPU streams; this file does not repeat them.
"""

import pytest
import torch

import enat_kernels  # noqa: F401  (registers torch.ops.enat)
from enat_kernels.ops.gather_scatter import (
    gather_tokens_reference,
    scatter_into_zeros_reference,
    scatter_tokens_reference,
    zero_rows_reference,
)
from enat_kernels.ops.mask_to_index import mask_to_index_reference
from enat_kernels.ops.merge_cache import merge_cache_backward_reference, merge_cache_reference
from enat_kernels.ops.split_restore import restore_tokens_reference, split_tokens_reference

import helpers

pytestmark = helpers.needs_gpu
ops = torch.ops.enat

# (dtype, D) -> chunk width and lanes per row (kVec chunks per lane: 4 of 16 bytes, 8 of 8 bytes, 8 below).
ROW_SHAPES = [
    (torch.float16, 8),      # 16 B: 1 chunk of 16, 1 lane
    (torch.float16, 64),     # 16 B chunks: 8 chunks, 2 lanes
    (torch.bfloat16, 256),   # 16 B: 32 chunks, 8 lanes
    (torch.float16, 1024),   # 16 B: 128 chunks, one warp, one pass
    (torch.bfloat16, 4096),  # 16 B: 512 chunks, one warp, four passes
    (torch.float32, 2),      # 8 B: 1 chunk
    (torch.float16, 100),    # 8 B: 25 chunks, 4 lanes
    (torch.float32, 61),     # 4 B: 61 chunks, 8 lanes
    (torch.int32, 1001),     # 4 B: 1001 chunks, a warp, four passes
    (torch.float16, 3),      # 2 B: 3 chunks, 1 lane
    (torch.bfloat16, 133),   # 2 B: 133 chunks, 32 lanes
    (torch.uint8, 1),        # 1 B: 1 chunk
    (torch.uint8, 61),       # 1 B: 61 chunks, 8 lanes
    (torch.int8, 2049),      # 1 B: 2049 chunks, a warp, nine passes
]


def rid(shape):
    dtype, D = shape
    return f"{str(dtype).split('.')[-1]}-D{D}"


def random_rows(shape, dtype, generator):
    if dtype.is_floating_point:
        return torch.randn(shape, generator=generator).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(info.min, info.max, shape, generator=generator, dtype=torch.int64).to(dtype)


def random_mask(B, L, n, generator):
    scores = torch.rand(B, L, generator=generator)
    mask = torch.zeros(B, L, dtype=torch.bool)
    if n:
        mask.scatter_(1, scores.topk(n, dim=1).indices, True)
    return mask


def sorted_positions(mask):
    return torch.sort(torch.where(mask, torch.arange(mask.shape[1]), mask.shape[1]), dim=1).values


def offset_view(t):
    """A copy of t one element into its buffer, rows padded by one element: base address and row
    stride are only element-aligned, so the kernels fall back to narrower chunks."""
    B, R, D = t.shape
    flat = torch.zeros(B * R * (D + 1) + 1, dtype=t.dtype, device=t.device)
    view = flat[1:].view(B, R, D + 1)[..., :D]
    view.copy_(t)
    return view


LAYOUTS = {"contiguous": lambda t: t, "strided": helpers.strided, "offset": offset_view, "padded": helpers.padded}


def make(B, L, n, dtype, D, layout="contiguous", seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = random_mask(B, L, n, g)
    index = sorted_positions(mask)[:, :n].contiguous()
    x = random_rows((B, L, D), dtype, g)
    src = random_rows((B, n, D), dtype, g)
    f = LAYOUTS[layout]
    return f(x.cuda()), mask.cuda(), index.cuda(), f(src.cuda())


def equal(got, want, what):
    assert got.shape == want.shape and got.dtype == want.dtype, f"{what}: {got.dtype}{list(got.shape)}"
    assert got.is_contiguous(), f"{what}: result not contiguous"
    assert torch.equal(got, want), f"{what}: differs from the reference"


def check_all_ops(B, L, n, dtype, D, layout="contiguous", seed=0):
    x, mask, index, src = make(B, L, n, dtype, D, layout, seed)
    tag = f"B{B} L{L} n{n} {dtype} D{D} {layout}"
    equal(ops.gather_tokens_cuda(x, index), gather_tokens_reference(x, index), f"gather {tag}")
    equal(ops.scatter_tokens_cuda(x, index, src), scatter_tokens_reference(x, index, src), f"scatter {tag}")
    equal(ops.scatter_into_zeros_cuda(index, src, L), scatter_into_zeros_reference(index, src, L), f"zeros {tag}")
    equal(ops.zero_rows_cuda(x, index), zero_rows_reference(x, index), f"zero_rows {tag}")
    base = x.clone()
    ops.scatter_tokens_inplace_cuda(base, index, src)
    assert torch.equal(base, scatter_tokens_reference(x, index, src)), f"scatter_ {tag}"
    visible, masked = ops.split_tokens_cuda(x, mask, n)
    want_visible, want_masked = split_tokens_reference(x, mask, n)
    equal(visible, want_visible, f"split visible {tag}")
    equal(masked, want_masked, f"split masked {tag}")
    equal(ops.restore_tokens_cuda(visible, masked, mask), x.contiguous(), f"restore {tag}")
    equal(ops.restore_tokens_cuda(visible, masked, mask), restore_tokens_reference(visible, masked, mask), f"restore {tag}")
    # merge: the masked rows are fresh, the visible rows cached.
    cached_index = sorted_positions(~mask.cpu())[:, : L - n].contiguous().cuda()
    merged = ops.merge_cache_cuda(masked, index, visible, cached_index)
    equal(merged, merge_cache_reference(masked, index, visible, cached_index), f"merge {tag}")
    equal(merged, x.contiguous(), f"merge = x {tag}")
    grad = x  # any (B, L, D) with the layout under test
    got_f, got_c = ops.merge_cache_backward_cuda(grad, index, cached_index)
    want_f, want_c = merge_cache_backward_reference(grad, index, cached_index)
    equal(got_f, want_f, f"merge backward fresh {tag}")
    equal(got_c, want_c, f"merge backward cached {tag}")


@pytest.mark.parametrize("shape", ROW_SHAPES, ids=rid)
def test_every_chunk_width_and_lane_count(shape):
    dtype, D = shape
    check_all_ops(3, 37, 14, dtype, D, seed=D)


@pytest.mark.parametrize("layout", ["strided", "offset", "padded"])
@pytest.mark.parametrize("shape", [(torch.float16, 1024), (torch.float16, 3), (torch.uint8, 61), (torch.float32, 61)], ids=rid)
def test_views(shape, layout):
    dtype, D = shape
    check_all_ops(4, 29, 11, dtype, D, layout, seed=7)


@pytest.mark.parametrize("n", [0, 1, 300, 301])
def test_n_zero_and_n_full(n):
    check_all_ops(2, 301, n, torch.bfloat16, 1024, seed=n)


@pytest.mark.parametrize("B,L,n", [(1, 1, 0), (1, 1, 1), (5, 1, 1), (3, 2, 1)])
def test_tiny(B, L, n):
    check_all_ops(B, L, n, torch.float16, 8, seed=B + L)


@pytest.mark.parametrize("shape", [(torch.uint8, 3), (torch.float16, 64)], ids=rid)
def test_grid_stride_wraps(shape):
    """Far more tiles than resident blocks (SMs x 3): blocks take long ranges of tiles that cross
    batch rows, and split/restore carry the mask count from tile to tile."""
    dtype, D = shape
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    B, L = 96, 4 * 256 * sms // 96 * 8 + 37  # > 8 tiles of 256 per block
    check_all_ops(B, L, L // 3, dtype, D, seed=3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("L,n", [(256, 64), (1024, 1000)])
def test_model_sizes(dtype, L, n):
    check_all_ops(64, L, n, dtype, 1024, seed=L + n)


def test_wide_rows_many_tiles():
    check_all_ops(16, 520, 260, torch.bfloat16, 4096, seed=11)


def test_violating_mask_stays_in_bounds():
    """Rows of a mask with the wrong number of Trues: split skips the rows past an output, restore
    zero-fills rows without a source, mask_to_index fills missing slots with L; inputs are padded
    with NaN, so an out-of-bounds read would show up."""
    B, L, n, D = 4, 700, 300, 64
    g = torch.Generator().manual_seed(5)
    mask = random_mask(B, L, n, g)
    mask[0] = False
    mask[0, :10] = True  # too few Trues
    mask[1] = True  # too many
    mask[2, :] = False
    mask[2, 1::2] = True  # 350 Trues
    x = helpers.padded(torch.randn(B, L, D, generator=g).half().cuda())
    mask = mask.cuda()
    visible, masked = ops.split_tokens_cuda(x, mask, n)
    assert visible.shape == (B, L - n, D) and masked.shape == (B, n, D)
    pos_t, pos_f = sorted_positions(mask.cpu()), sorted_positions(~mask.cpu())
    for b in range(B):
        k = min(n, int(mask[b].sum()))
        kf = min(L - n, L - int(mask[b].sum()))
        assert torch.equal(masked[b, :k], x[b, pos_t[b, :k].cuda()]), f"masked row {b}"
        assert torch.equal(visible[b, :kf], x[b, pos_f[b, :kf].cuda()]), f"visible row {b}"
    vis_in = helpers.padded(torch.randn(B, L - n, D, generator=g).half().cuda())
    msk_in = helpers.padded(torch.randn(B, n, D, generator=g).half().cuda())
    out = ops.restore_tokens_cuda(vis_in, msk_in, mask)
    assert not torch.isnan(out).any()
    want = torch.zeros(B, L, D, dtype=torch.float16)
    for b in range(B):
        t = pos_t[b][pos_t[b] < L][:n]
        f = pos_f[b][pos_f[b] < L][: L - n]
        want[b, t] = msk_in[b, : len(t)].cpu()
        want[b, f] = vis_in[b, : len(f)].cpu()
    assert torch.equal(out.cpu(), want)
    got = ops.mask_to_index_cuda(mask, n)
    assert torch.equal(got.cpu(), torch.where(pos_t[:, :n] < L, pos_t[:, :n], L))
    assert torch.equal(got.cpu()[3], mask_to_index_reference(mask.cpu(), n)[3])  # a row that keeps the count


def test_inplace_scatter_skips_positions_out_of_range():
    B, L, n, D = 3, 50, 6, 24
    x, _, _, src = make(B, L, n, torch.float16, D, seed=9)
    index = torch.tensor([[-1, 0, 5, 9, 49, 50], [-7, -2, 3, 4, 60, 70], [1, 2, 3, 4, 5, 6]]).cuda()
    base = x.clone()
    ops.scatter_tokens_inplace_cuda(base, index, src)
    want = x.clone()
    for b in range(B):
        for j in range(n):
            p = int(index[b, j])
            if 0 <= p < L:
                want[b, p] = src[b, j]
    assert torch.equal(base, want)


def test_merge_ties_and_unsorted_rows_stay_in_bounds():
    """Index rows that break the contract: a position in both sets (fresh first, as the stable sort
    of the reference) and a descending row (anything, but no out-of-bounds read: inputs are padded
    with NaN)."""
    B, nf, nc, D = 2, 300, 200, 64
    g = torch.Generator().manual_seed(2)
    fresh = helpers.padded(torch.randn(B, nf, D, generator=g).half().cuda())
    cached = helpers.padded(torch.randn(B, nc, D, generator=g).half().cuda())
    fi = torch.stack([torch.randperm(1000, generator=g)[:nf].sort().values for _ in range(B)])
    ci = torch.stack([torch.randperm(1000, generator=g)[:nc].sort().values for _ in range(B)])
    fi[0] = torch.arange(0, 2 * nf, 2)
    ci[0] = torch.arange(0, 2 * nc, 2)  # every cached position is also a fresh one
    fi[1] = fi[1].flip(0)
    fi, ci = fi.cuda(), ci.cuda()
    out = ops.merge_cache_cuda(fresh, fi, cached, ci)
    assert not torch.isnan(out).any()
    assert torch.equal(out[0], merge_cache_reference(fresh, fi, cached, ci)[0])
    grad = helpers.padded(torch.randn(B, nf + nc, D, generator=g).half().cuda())
    gf, gc = ops.merge_cache_backward_cuda(grad, fi, ci)
    assert gf.shape == (B, nf, D) and gc.shape == (B, nc, D)

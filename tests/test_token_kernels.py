"""The token-movement kernels themselves, against the exact oracle (tests/oracle.py); the ops'
contract on every backend is tests/test_tokens.py's.

The Triton launchers called directly (enat_kernels/ops/_tiles.py describes their tiles): every
autotuning config of each, rows wider than one tile, mask rows with the wrong count and broken index
rows (never out of bounds). On a GPU, every kernel backend of the token ops: no host sync
(torch.cuda.set_sync_debug_mode("error")), CUDA-graph capture and torch.compile. Token movement is
exact, so every comparison is torch.equal.
"""

import sys

import pytest
import torch

import enat_kernels.ops as K
from enat_kernels import backends, info
from enat_kernels.ops import _tiles

import helpers
import oracle

TOKEN_OPS = [op for op, spec in info.OPS.items() if spec.kind == "tokens"]
LAYOUTS = {"contiguous": lambda t: t, "strided": helpers.strided, "padded": helpers.padded}
# The backends with a kernel (not the reference) for every token op, for the GPU-only tests.
KERNELS = [pytest.param(b, marks=[] if backends.device_for(b) == "cuda" else [pytest.mark.skip(
               reason=f"{b} does not run on a GPU here")], id=b)
           for b in backends.BACKENDS
           if b != "reference" and all(b in backends.DISPATCHERS[op].impls for op in TOKEN_OPS)]


def equal(out, ref, what):
    assert out.shape == ref.shape and out.dtype == ref.dtype, f"{what}: {out.dtype}{list(out.shape)}"
    assert not (out.is_floating_point() and torch.isnan(out).any()), f"{what}: NaN (an out-of-bounds read?)"
    assert torch.equal(out.cpu(), ref.cpu()), f"{what}: differs from the oracle"


def inputs(case, dtype, device, layout):
    """x (B, L, D), mask (B, L) with n True per row, its index and the visible index, src (B, n, D)."""
    B, L, n, D = case
    g = torch.Generator().manual_seed(sum(case))
    mask = oracle.random_mask(B, L, n, generator=g)
    x = oracle.random_tensor((B, L, D), dtype, generator=g)
    src = oracle.random_tensor((B, n, D), dtype, generator=g)
    index, visible_index = oracle.mask_to_index(mask), oracle.mask_to_index(~mask)
    f = LAYOUTS[layout]
    to = lambda t: f(t.to(device))  # noqa: E731
    return to(x), to(mask), to(index), to(visible_index), to(src)


@helpers.needs_triton
def test_rows_with_the_wrong_count_never_go_out_of_bounds():
    """A mask row with fewer True entries than n_masked breaks the precondition: the Triton kernels
    leave the missing slots (L in mask_to_index, zeros in restore) instead of reading or writing
    outside the tensors. (On CPU the op checks values first; the kernels are called directly here.)"""
    from enat_kernels.ops.mask_to_index import mask_to_index_triton
    from enat_kernels.ops.split_restore import restore_tokens_triton

    if helpers.triton_device() != "cpu":
        pytest.skip("calls the Triton launchers on CPU tensors, which needs the interpreter (no GPU)")
    mask = torch.tensor([[True, False, True, False], [False, False, True, False]])
    assert mask_to_index_triton(mask, 2).tolist() == [[0, 2], [2, 4]]
    visible = helpers.padded(torch.ones(2, 2, 3))
    masked = helpers.padded(torch.full((2, 2, 3), 2.0))
    out = restore_tokens_triton(visible, masked, mask)
    assert not torch.isnan(out).any()
    assert out[1, 3].tolist() == [0.0, 0.0, 0.0]  # the third visible row does not exist


# The Triton kernels themselves (enat_kernels/ops/_tiles.py describes their tiles): every config of
# every kernel, called directly with `config=`, on shapes that take several programs per batch row and
# several rows per program with a partial last block, D not a power of two, offset and strided views.

GS = sys.modules["enat_kernels.ops.gather_scatter"]
SR = sys.modules["enat_kernels.ops.split_restore"]
MC = sys.modules["enat_kernels.ops.merge_cache"]
CONFIGS = _tiles.TOKEN_CONFIGS if _tiles.triton is not None else []


def config_id(c):
    return f"tile{c.kwargs['TILE_BYTES'] // 1024}k-w{c.num_warps}"


def offset_view(t):
    """A copy of t at a storage offset, every stride padded and the last dim strided by 2, with
    sentinels (NaN, the int max, True) everywhere else in the storage."""
    sentinel = float("nan") if t.is_floating_point() else True if t.dtype == torch.bool else torch.iinfo(t.dtype).max
    *lead, last = t.shape
    store = torch.full((*(s + 1 for s in lead), 2 * last + 1), sentinel, dtype=t.dtype, device=t.device)
    view = store[(*(slice(1, None) for _ in lead), slice(1, 2 * last + 1, 2))]
    view.copy_(t)
    return view


def merge_backward_oracle(grad, fresh_index, cached_index):
    """(grad rows at the fresh ranks, at the cached ranks) in the merged order."""
    sides = ([], [])
    for b in range(grad.shape[0]):
        union = sorted(fresh_index[b].tolist() + cached_index[b].tolist())
        for side, index in zip(sides, (fresh_index, cached_index)):
            ranks = [union.index(p) for p in index[b].tolist()]
            side.append(grad[b, ranks])
    return tuple(torch.stack(side) for side in sides)


def every_kernel(x, mask, index, src, config, what):
    """Every Triton token launcher on x (B, L, D), mask (B, L), its index (B, n) and src (B, n, D),
    against the oracle; merge_cache of the masked rows with every other visible row."""
    B, L, D = x.shape
    xc, maskc, indexc, srcc = (t.cpu() for t in (x, mask, index, src))
    equal(GS.gather_tokens_triton(x, index, config=config), oracle.gather(xc, indexc), f"gather {what}")
    expected = oracle.scatter(xc, indexc, srcc)
    equal(GS.scatter_tokens_triton(x, index, src, config=config), expected, f"scatter {what}")
    base = x.clone()
    GS.scatter_tokens_inplace_triton(base, index, src, config=config)
    equal(base, expected, f"scatter_ {what}")
    zeros = torch.zeros_like(xc)
    equal(GS.scatter_into_zeros_triton(index, src, L, config=config), oracle.scatter(zeros, indexc, srcc),
          f"scatter_into_zeros {what}")
    equal(GS.zero_rows_triton(x, index, config=config), oracle.scatter(xc, indexc, torch.zeros_like(srcc)),
          f"zero_rows {what}")
    visible, masked = SR.split_tokens_triton(x, mask, index.shape[1], config=config)
    ref_visible, ref_masked = oracle.split(xc, maskc)
    equal(visible, ref_visible, f"split visible {what}")
    equal(masked, ref_masked, f"split masked {what}")
    equal(SR.restore_tokens_triton(visible, masked, mask, config=config), xc, f"restore {what}")
    cached_index = oracle.mask_to_index(~maskc)[:, ::2].contiguous().to(x.device)
    cached = ref_visible[:, ::2].to(x.device)
    merged = MC.merge_cache_triton(masked, index, cached, cached_index, config=config)
    equal(merged, oracle.merge(ref_masked, indexc, cached.cpu(), cached_index.cpu()), f"merge_cache {what}")
    grad = x[:, : merged.shape[1]]
    grads = MC.merge_cache_backward_triton(grad, index, cached_index, config=config)
    wanted = merge_backward_oracle(grad.cpu(), indexc, cached_index.cpu())
    for got, want, side in zip(grads, wanted, ("fresh", "cached")):
        equal(got, want, f"merge_cache_backward {side} {what}")


# (B, L, n, D, dtype, layout): rows of 4 KB (D = 1000 fp32: 2 to 16 rows per program over the
# configs) and of a few bytes (D = 3, 61: 64 rows per program), L and B * n never a multiple of that.
CONFIG_CASES = [
    (1, 19, 7, 1000, torch.float32, "contiguous"),
    (2, 150, 70, 3, torch.float16, "offset"),
    (2, 70, 35, 61, torch.int64, "strided"),
]


def config_case_id(c):
    return "B{}-L{}-n{}-D{}-{}-{}".format(*c[:4], str(c[4]).removeprefix("torch."), c[5])


@helpers.needs_triton
@pytest.mark.parametrize("case", CONFIG_CASES, ids=config_case_id)
@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
def test_every_config_of_every_token_kernel(config, case):
    B, L, n, D, dtype, layout = case
    block_d = _tiles.row_tile(D)[0]
    args = {"BLOCK_D": block_d, "x": torch.empty(0, dtype=dtype), "TILE_BYTES": config.kwargs["TILE_BYTES"],
            "rows_key": _tiles.rows_bucket(L)}
    block_n = _tiles.block_rows("x")(args)
    assert 1 < block_n < L and L % block_n and (B * n) % block_n, f"{block_n} rows per program"
    g = torch.Generator().manual_seed(L)
    mask = oracle.random_mask(B, L, n, generator=g)
    x = oracle.random_tensor((B, L, D), dtype, generator=g)
    src = oracle.random_tensor((B, n, D), dtype, generator=g)
    view = {"contiguous": lambda t: t, "offset": offset_view, "strided": helpers.strided}[layout]
    to = lambda t: view(t.to(helpers.triton_device()))  # noqa: E731
    every_kernel(to(x), to(mask), to(oracle.mask_to_index(mask)), to(src), config, f"{config_id(config)} {case}")


@helpers.needs_triton
@pytest.mark.parametrize("case", [(1, 4, 2, _tiles.MAX_BLOCK_D + 61, torch.float32),
                                  (1, 3, 1, 2 * _tiles.MAX_BLOCK_D, torch.int8)], ids=lambda c: f"D{c[3]}")
def test_rows_wider_than_one_tile(case):
    """D above MAX_BLOCK_D: several programs along D (the last one partial, or all full)."""
    B, L, n, D, dtype = case
    g = torch.Generator().manual_seed(D)
    mask = oracle.random_mask(B, L, n, generator=g)
    x = oracle.random_tensor((B, L, D), dtype, generator=g)
    src = oracle.random_tensor((B, n, D), dtype, generator=g)
    to = lambda t: offset_view(t.to(helpers.triton_device()))  # noqa: E731
    every_kernel(to(x), to(mask), to(oracle.mask_to_index(mask)), to(src), None, f"D={D}")


@helpers.needs_triton
def test_masks_with_the_wrong_count_stay_in_bounds():
    """Mask rows with more or fewer True entries than n_masked, on tensors whose storage runs on in
    NaN: split writes the rows that have a slot (the first n masked, the first L - n visible) and
    nothing else, restore zero-fills positions whose row does not exist. Several programs per row."""
    B, L, n, D = 3, 40, 12, 64
    device = helpers.triton_device()
    counts = (4, 12, 30)  # fewer, exactly, more
    mask = torch.zeros(B, L, dtype=torch.bool)
    for b, count in enumerate(counts):
        mask[b, torch.randperm(L)[:count]] = True
    x = torch.randn(B, L, D)
    config = CONFIGS[-1]  # the smallest tiles: 32 rows of D = 64 fp32 per program
    visible, masked = SR.split_tokens_triton(helpers.padded(x.to(device)), helpers.padded(mask.to(device)), n,
                                             config=config)
    visible_in = helpers.padded(torch.randn(B, L - n, D).to(device))
    masked_in = helpers.padded(torch.randn(B, n, D).to(device))
    out = SR.restore_tokens_triton(visible_in, masked_in, helpers.padded(mask.to(device)), config=config).cpu()
    for b in range(B):
        m_pos, v_pos = mask[b].nonzero().flatten(), (~mask[b]).nonzero().flatten()
        k, v = min(len(m_pos), n), min(len(v_pos), L - n)
        equal(masked[b, :k], x[b, m_pos[:k]], f"split masked row {b}")
        equal(visible[b, :v], x[b, v_pos[:v]], f"split visible row {b}")
        expected = torch.zeros(L, D)
        expected[m_pos[:k]] = masked_in[b, :k].cpu()
        expected[v_pos[:v]] = visible_in[b, :v].cpu()
        equal(out[b], expected, f"restore row {b}")


@helpers.needs_triton
def test_broken_index_rows_stay_in_bounds():
    """Index rows that are not ascending, repeat, or leave [0, L) (the precondition checked only on CPU
    or in debug mode): the out-of-place scatters and merge_cache, called directly, write every output
    row from inside the inputs (NaN past their end would show)."""
    B, L, D = 4, 9, 5
    device = helpers.triton_device()
    index = torch.tensor([[8, 3, 5, 0], [2, 2, 2, 2], [-4, 1, 9, 100], [0, 1, 2, 3]])
    other = torch.tensor([[1, 1, 7], [9, 0, 3], [5, 4, 3], [0, 2, 4]])
    pad = lambda t: helpers.padded(t.to(device))  # noqa: E731
    x, src, cached = pad(torch.randn(B, L, D)), pad(torch.randn(B, 4, D)), pad(torch.randn(B, 3, D))
    for config in CONFIGS[:1] + CONFIGS[-1:]:
        outs = {
            "scatter": GS.scatter_tokens_triton(x, pad(index), src, config=config),
            "scatter_into_zeros": GS.scatter_into_zeros_triton(pad(index), src, L, config=config),
            "zero_rows": GS.zero_rows_triton(x, pad(index), config=config),
            "merge_cache": MC.merge_cache_triton(src, pad(index), cached, pad(other), config=config),
        }
        for name, out in outs.items():
            assert not torch.isnan(out).any(), f"{name} {config_id(config)}: read outside its inputs"


# GPU only.


@helpers.needs_gpu
@pytest.mark.parametrize("backend", KERNELS)
def test_no_host_sync_with_counts_given(backend):
    x, mask, index, visible_index, src = inputs((4, 256, 100, 64), torch.float16, "cuda", "contiguous")
    x.requires_grad_(True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        idx = K.mask_to_index(mask, 100, backend=backend)
        gathered = K.gather_tokens(x, idx, backend=backend)
        scattered = K.scatter_tokens(x, idx, src, backend=backend)
        visible, masked = K.split_tokens(x, mask, 100, backend=backend)
        merged = K.merge_cache(masked, idx, visible, visible_index, backend=backend)
        restored = K.restore_tokens(visible, masked, mask, backend=backend)
        (gathered.sum() + scattered.sum() + merged.sum() + restored.sum()).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    equal(restored.detach(), x.detach(), f"round trip {backend}")


@helpers.needs_gpu
@pytest.mark.parametrize("backend", KERNELS)
def test_cuda_graph_capture(backend):
    x, mask, index, visible_index, src = inputs((4, 64, 20, 128), torch.bfloat16, "cuda", "contiguous")

    def step():
        idx = K.mask_to_index(mask, 20, backend=backend)
        visible, masked = K.split_tokens(x, mask, 20, backend=backend)
        return K.merge_cache(K.gather_tokens(x, idx, backend=backend), idx, visible, visible_index, backend=backend)

    step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    equal(out, x, f"graph replay {backend}")


@helpers.needs_gpu
@pytest.mark.parametrize("backend", KERNELS)
def test_compile_on_gpu(backend):
    """torch.compile(fullgraph=True) of a chain of the ops on strided inputs equals the eager chain
    (opcheck of each op on each backend: tests/test_tokens.py)."""
    x, mask, index, visible_index, src = inputs((2, 13, 5, 61), torch.float32, "cuda", "strided")

    def f(x, src):
        idx = K.mask_to_index(mask, 5, backend=backend)
        visible, masked = K.split_tokens(x, mask, 5, backend=backend)
        return K.restore_tokens(visible, K.gather_tokens(K.scatter_tokens(x, idx, src, backend=backend), idx,
                                                         backend=backend), mask, backend=backend)

    torch._dynamo.reset()
    equal(torch.compile(f, fullgraph=True)(x, src), f(x, src), f"compiled {backend}")

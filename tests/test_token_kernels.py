"""The token-movement kernels (Triton, CUDA) against the exact oracle (tests/oracle.py).

Every op, forward and backward, on every kernel backend that can run in this session: Triton on
the GPU or in its interpreter on CPU tensors (no GPU), CUDA on the GPU. Awkward sizes (n = 0,
n = L, D = 3, 8, 61, 1024), non-contiguous inputs and NaN past each tensor's logical end. On a GPU
also: no host sync (torch.cuda.set_sync_debug_mode("error")), CUDA-graph capture, opcheck and
torch.compile. Token movement is exact, so every comparison is torch.equal.
"""

import pytest
import torch

import enat_kernels.ops as K

import helpers
import oracle

DEVICES = {"triton": helpers.triton_device(), "cuda": "cuda"}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "int64": torch.int64}
# (B, L, n, D): n = 0, n = L, L = 1, odd and prime sizes, D in {3, 8, 61, 1024}.
CASES = [(2, 7, 0, 8), (2, 7, 7, 3), (1, 1, 1, 61), (2, 13, 5, 61), (1, 9, 4, 1024), (3, 10, 3, 8)]
LAYOUTS = {"contiguous": lambda t: t, "strided": helpers.strided, "padded": helpers.padded}


def backends():
    return [
        pytest.param(b, marks=[helpers.needs_triton] if b == "triton" else [helpers.needs_gpu], id=b)
        for b in DEVICES
    ]


def cid(c):
    return "B{}-L{}-n{}-D{}".format(*c)


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


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("case", CASES, ids=cid)
def test_every_op_matches_the_oracle(case, dtype, layout, backend):
    B, L, n, D = case
    x, mask, index, visible_index, src = inputs(case, dtype, DEVICES[backend], layout)
    what = f"{backend} {cid(case)} {dtype} {layout}"
    cpu = lambda t: t.cpu()  # noqa: E731
    equal(K.mask_to_index(mask, n, backend=backend), oracle.mask_to_index(cpu(mask)), f"mask_to_index {what}")
    equal(K.gather_tokens(x, index, backend=backend), oracle.gather(cpu(x), cpu(index)), f"gather {what}")
    expected = oracle.scatter(cpu(x), cpu(index), cpu(src))
    equal(K.scatter_tokens(x, index, src, backend=backend), expected, f"scatter {what}")
    base = x.clone()
    assert K.scatter_tokens_(base, index, src, backend=backend) is base
    equal(base, expected, f"scatter_ {what}")
    visible, masked = K.split_tokens(x, mask, n, backend=backend)
    ref_visible, ref_masked = oracle.split(cpu(x), cpu(mask))
    equal(visible, ref_visible, f"split visible {what}")
    equal(masked, ref_masked, f"split masked {what}")
    v, m = LAYOUTS[layout](ref_visible.to(x.device)), LAYOUTS[layout](ref_masked.to(x.device))
    equal(K.restore_tokens(v, m, mask, backend=backend), oracle.restore(ref_visible, ref_masked, cpu(mask)), f"restore {what}")
    merged = K.merge_cache(m, index, v, visible_index, backend=backend)
    equal(merged, oracle.merge(ref_masked, cpu(index), ref_visible, cpu(visible_index)), f"merge_cache {what}")


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("case", CASES, ids=cid)
def test_every_backward_matches_the_reference(case, backend):
    """Gradients through each op (one-launch backward kernels) equal the reference backend's, which
    test_tokens.py checks with gradcheck."""
    B, L, n, D = case
    x, mask, index, visible_index, src = inputs(case, torch.float32, DEVICES[backend], "strided")
    weights = torch.randn(B, L, D, device=x.device)

    def grads(b):
        leaves = [t.detach().clone().requires_grad_() for t in (x, src)]
        xx, ss = leaves
        visible, masked = K.split_tokens(xx, mask, n, backend=b)
        restored = K.restore_tokens(visible * 2, masked * 3, mask, backend=b)
        merged = K.merge_cache(masked, index, visible, visible_index, backend=b)
        scattered = K.scatter_tokens(xx, index, ss, backend=b)
        gathered = K.gather_tokens(xx, index, backend=b)
        loss = ((restored + merged + scattered) * weights).sum() + (gathered * weights[:, :n]).sum()
        return torch.autograd.grad(loss, leaves)

    for name, got, want in zip(("x", "src"), grads(backend), grads("reference")):
        equal(got, want, f"d{name} {backend} {cid(case)}")


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


# GPU only.


@helpers.needs_gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
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
@pytest.mark.parametrize("backend", ["triton", "cuda"])
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
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_opcheck_and_compile_on_gpu(backend):
    x, mask, index, visible_index, src = inputs((2, 13, 5, 61), torch.float32, "cuda", "strided")
    ops = torch.ops.enat
    for op, args in (
        (ops.mask_to_index.default, (mask, 5, backend)),
        (ops.gather_tokens.default, (x, index, backend)),
        (ops.scatter_tokens.default, (x, index, src, backend)),
        (ops.split_tokens.default, (x, mask, 5, backend)),
        (ops.merge_cache.default, (src, index, x[:, :8], visible_index, backend)),
    ):
        torch.library.opcheck(op, args)

    def f(x, src):
        idx = K.mask_to_index(mask, 5, backend=backend)
        visible, masked = K.split_tokens(x, mask, 5, backend=backend)
        return K.restore_tokens(visible, K.gather_tokens(K.scatter_tokens(x, idx, src, backend=backend), idx,
                                                         backend=backend), mask, backend=backend)

    torch._dynamo.reset()
    equal(torch.compile(f, fullgraph=True)(x, src), f(x, src), f"compiled {backend}")

"""The critical-token movement ops' contract (docs/OPS.md section 2) on every backend that has them:
exact equality with the oracle (tests/oracle.py; token movement is exact), awkward shapes (n = 0,
n = L, L = 1, D in {1, 3, 8, 61, 1024}), non-contiguous inputs, NaN-filled memory past the logical
end, gradients, opcheck, and bad input.

The ops are info.OPS's token ops and the backends those with an implementation of the op, each run
where it can run on this machine (enat_kernels.backends.device_for): the reference on CPU tensors
(the GPU where there is one), Triton in its interpreter on CPU tensors (tests/conftest.py) or on
the GPU, CUDA on the GPU. The kernels' own internals (every config, tiles, broken preconditions, GPU
streams and graphs) are tests/test_token_kernels.py's.
"""

import pytest
import torch

import enat_kernels.ops as K
from enat_kernels import backends, info
from enat_kernels.backends import BackendUnavailableError

import helpers
import oracle

TOKEN_OPS = [op for op, spec in info.OPS.items() if spec.kind == "tokens"]

DTYPES = {
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "fp32": torch.float32,
    "fp64": torch.float64,
    "int32": torch.int32,
}

# (B, L, n, D): n = 0, n = L, L = 1, every D in {1, 3, 8, 61, 1024}, B in {1, 3}.
CASES = [
    (1, 1, 0, 1),
    (1, 1, 1, 3),
    (3, 9, 0, 8),
    (3, 9, 9, 61),
    (3, 17, 5, 1024),
    (1, 33, 16, 61),
    (3, 8, 1, 3),
]


def cid(c):
    return "B{}-L{}-n{}-D{}".format(*c)


def backends_of(*ops):
    """pytest params of every backend with an implementation of each of `ops`, skipped where it cannot
    run here."""
    params = []
    for name in backends.BACKENDS:
        if not all(name in backends.DISPATCHERS[op].impls for op in ops):
            continue
        marks = []
        if backends.device_for(name) is None:
            why = backends.REGISTRY[name].device_reasons(torch.device("cuda"), True)
            marks.append(pytest.mark.skip(reason=f"{name} cannot run here: {'; '.join(why) or 'no GPU'}"))
        params.append(pytest.param(name, marks=marks, id=name))
    return params


def kernels_of(*ops):
    """backends_of(*ops) without the reference: the kernels, checked against the reference backend."""
    return [p for p in backends_of(*ops) if p.values[0] != "reference"]


def op_backends(ops, of=backends_of):
    """pytest params (op, backend) of each op of `ops` on each of its backends (`of`: or its kernels)."""
    return [pytest.param(op, *b.values, marks=b.marks, id=f"{op}-{b.id}") for op in ops for b in of(op)]


def data(shape, dtype=torch.float32, device="cpu"):
    return oracle.random_tensor(shape, dtype).to(device)


def on(backend, *tensors):
    """The tensors on the device where `backend` runs."""
    device = backends.device_for(backend)
    moved = tuple(t.to(device) for t in tensors)
    return moved if len(moved) > 1 else moved[0]


def forced(op, backend, *args):
    """K.<op>(*args, backend=backend). The one limit a kernel declares for these tests' inputs, the CUDA
    row kernels' contiguous last dimension, skips the test naming why; any other refusal fails it."""
    try:
        return getattr(K, op)(*args, backend=backend)
    except BackendUnavailableError as e:
        if "is not contiguous in its last dimension" not in str(e):
            raise
        pytest.skip(f"{backend} declines these inputs: {e}")


def no_nan(t):
    return not (t.is_floating_point() and torch.isnan(t).any())


def assert_exact(out, ref, what=""):
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert out.dtype == ref.dtype, f"{what}: dtype {out.dtype} != {ref.dtype}"
    assert no_nan(out), f"{what}: NaN in the result (an out-of-bounds read?)"
    assert torch.equal(out.cpu(), ref.cpu()), f"{what}: values differ from the oracle"


def cpu(*tensors):
    moved = tuple(t.cpu() for t in tensors)
    return moved if len(moved) > 1 else moved[0]


# Layouts. Each returns a tensor equal to its argument, stored differently.


def expanded_rows(t):
    """t (B, ...) rebuilt as row 0 expanded over the batch (stride 0): only valid if all rows are equal,
    so callers build their input from row 0 first."""
    return t[:1].expand(t.shape)


def transposed_bl(t):
    """(B, L, ...) stored as (L, B, ...) and transposed back: rows of a batch are not adjacent."""
    return t.transpose(0, 1).contiguous().transpose(0, 1)


def index_t(idx):
    """(B, n) index as the transpose of a contiguous (n, B) tensor."""
    return idx.t().contiguous().t()


DATA_LAYOUTS = {
    "contiguous": lambda t: t,
    "strided": helpers.strided,
    "padded": helpers.padded,
    "transposed": transposed_bl,
    "last_dim_strided": lambda t: torch.repeat_interleave(t, 2, dim=-1)[..., ::2],
}
INDEX_LAYOUTS = {
    "contiguous": lambda t: t,
    "t": index_t,
    "padded": helpers.padded,
    "strided": helpers.strided,
}
MASK_LAYOUTS = {
    "t": lambda m: m.t().contiguous().t(),
    "strided": helpers.strided,  # the gaps hold True
    "padded": helpers.padded,  # True past the end
    "expanded": expanded_rows,
    "sliced": lambda m: torch.cat([m, ~m], dim=1)[:, : m.shape[1]],
}


def test_every_token_op_is_covered():
    """The ops this file iterates over are the registry's token ops, each with its bad inputs."""
    assert TOKEN_OPS and set(TOKEN_OPS) <= set(K.__all__) <= set(backends.DISPATCHERS)
    assert set(BAD_INPUTS) == set(TOKEN_OPS)


# mask_to_index.

MASK_CASES = [(1, 1, 0), (1, 1, 1), (3, 7, 0), (3, 7, 7), (3, 13, 5), (1, 64, 17), (2, 1000, 3)]


@pytest.mark.parametrize("backend", backends_of("mask_to_index"))
@pytest.mark.parametrize("given", [False, True], ids=["count_none", "count_given"])
@pytest.mark.parametrize("case", MASK_CASES, ids=lambda c: "B{}-L{}-n{}".format(*c))
def test_mask_to_index(case, given, backend):
    B, L, n = case
    mask = oracle.random_mask(B, L, n)
    out = forced("mask_to_index", backend, on(backend, mask), n if given else None)
    assert out.dtype == torch.int64 and out.shape == (B, n)
    assert_exact(out, oracle.mask_to_index(mask))


@pytest.mark.parametrize("backend", backends_of("mask_to_index"))
@pytest.mark.parametrize("given", [False, True], ids=["count_none", "count_given"])
@pytest.mark.parametrize("layout", list(MASK_LAYOUTS))
def test_mask_to_index_non_contiguous(layout, given, backend):
    B, L, n = 3, 11, 4
    mask = oracle.random_mask(B, L, n)
    if layout == "expanded":
        mask = mask[:1].expand(B, L).clone()
    view = MASK_LAYOUTS[layout](on(backend, mask))
    assert torch.equal(view.cpu(), mask)
    out = forced("mask_to_index", backend, view, n if given else None)
    assert_exact(out, oracle.mask_to_index(mask))


# gather_tokens.


@pytest.mark.parametrize("backend", backends_of("gather_tokens"))
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("case", CASES, ids=cid)
def test_gather(case, dtype, backend):
    B, L, n, D = case
    x, index = on(backend, data((B, L, D), dtype), oracle.random_index(B, L, n))
    out = forced("gather_tokens", backend, x, index)
    assert out.device == x.device
    assert_exact(out, oracle.gather(*cpu(x, index)), f"gather {cid(case)}")


@pytest.mark.parametrize("backend", backends_of("gather_tokens"))
@pytest.mark.parametrize("index_layout", [*INDEX_LAYOUTS, "expanded"])
@pytest.mark.parametrize("x_layout", [*DATA_LAYOUTS, "expanded"])
def test_gather_non_contiguous(x_layout, index_layout, backend):
    B, L, n, D = 3, 10, 4, 61
    x, index = on(backend, data((B, L, D)), oracle.random_index(B, L, n))
    x = expanded_rows(x) if x_layout == "expanded" else DATA_LAYOUTS[x_layout](x)
    index = expanded_rows(index) if index_layout == "expanded" else INDEX_LAYOUTS[index_layout](index)
    out = forced("gather_tokens", backend, x, index)
    assert_exact(out, oracle.gather(*cpu(x, index)), f"gather x:{x_layout} index:{index_layout}")


# scatter_tokens (out of place) and scatter_tokens_ (in place).


@pytest.mark.parametrize("op,backend", op_backends(["scatter_tokens", "scatter_tokens_"]))
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("case", CASES, ids=cid)
def test_scatter(case, dtype, op, backend):
    """scatter_tokens leaves base as it was and returns a new tensor; scatter_tokens_ writes into base
    and returns it."""
    B, L, n, D = case
    base, src, index = on(backend, data((B, L, D), dtype), data((B, n, D), dtype), oracle.random_index(B, L, n))
    before, ptr = base.clone(), base.data_ptr()
    out = forced(op, backend, base, index, src)
    assert_exact(out, oracle.scatter(*cpu(before, index, src)), f"{op} {cid(case)}")
    if op == "scatter_tokens_":
        assert out is base and base.data_ptr() == ptr, "scatter_tokens_ must write into base and return it"
    else:
        assert torch.equal(base, before), "scatter_tokens modified base"
        assert out.data_ptr() != base.data_ptr() or out.numel() == 0


SCATTER_LAYOUTS = {
    "base_strided": dict(base=helpers.strided),
    "base_padded": dict(base=helpers.padded),
    "base_transposed": dict(base=transposed_bl),
    "base_expanded": dict(base=expanded_rows),
    "base_last_dim_strided": dict(base=DATA_LAYOUTS["last_dim_strided"]),
    "src_strided": dict(src=helpers.strided),
    "src_padded": dict(src=helpers.padded),
    "src_transposed": dict(src=transposed_bl),
    "src_expanded": dict(src=expanded_rows),
    "index_t": dict(index=index_t),
    "index_padded": dict(index=helpers.padded),
    "index_strided": dict(index=helpers.strided),
    "index_expanded": dict(index=expanded_rows),
    "all_strided": dict(base=helpers.strided, src=helpers.strided, index=helpers.strided),
}


def _scatter_inputs(layout, B=3, L=10, n=4, D=61, dtype=torch.float32, device="cpu"):
    base = data((B, L, D), dtype, device)
    src = data((B, n, D), dtype, device)
    index = oracle.random_index(B, L, n).to(device)
    args = dict(base=base, index=index, src=src)
    for name, fn in SCATTER_LAYOUTS.get(layout, {}).items():
        args[name] = fn(args[name])
    return args["base"], args["index"], args["src"]


@pytest.mark.parametrize("backend", backends_of("scatter_tokens"))
@pytest.mark.parametrize("layout", list(SCATTER_LAYOUTS))
def test_scatter_non_contiguous(layout, backend):
    base, index, src = _scatter_inputs(layout, device=backends.device_for(backend))
    out = forced("scatter_tokens", backend, base, index, src)
    assert_exact(out, oracle.scatter(*cpu(base, index, src)), f"scatter {layout}")


def _storage_outside(view):
    """The elements of view's storage that the view does not cover (the NaN gaps and tail), on the CPU."""
    full = view._base if view._base is not None else view
    flat = full.flatten().cpu()
    covered = torch.zeros(flat.numel(), dtype=torch.bool)
    offs = torch.as_strided(
        torch.arange(flat.numel()), view.shape, view.stride(), view.storage_offset() - full.storage_offset()
    )
    covered[offs.flatten()] = True
    return flat[~covered]


@pytest.mark.parametrize("backend", backends_of("scatter_tokens_"))
@pytest.mark.parametrize(
    "layout", ["base_strided", "base_padded", "base_transposed", "base_last_dim_strided", "src_strided", "index_t", "all_strided"]
)
def test_scatter_inplace_non_contiguous(layout, backend):
    base, index, src = _scatter_inputs(layout, device=backends.device_for(backend))
    outside = _storage_outside(base).clone()
    expected = oracle.scatter(*cpu(base, index, src))
    out = forced("scatter_tokens_", backend, base, index, src)
    assert out is base
    assert_exact(base, expected, f"scatter_ {layout}")
    after = _storage_outside(base)
    assert torch.equal(after.isnan(), outside.isnan()) and torch.equal(
        after.nan_to_num(0), outside.nan_to_num(0)
    ), "scatter_tokens_ wrote outside base's view"


# split_tokens and restore_tokens.


@pytest.mark.parametrize("backend", backends_of("split_tokens"))
@pytest.mark.parametrize("given", [False, True], ids=["n_none", "n_given"])
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("case", CASES, ids=cid)
def test_split(case, dtype, given, backend):
    B, L, n, D = case
    x, mask = on(backend, data((B, L, D), dtype), oracle.random_mask(B, L, n))
    visible, masked = forced("split_tokens", backend, x, mask, n if given else None)
    ref_visible, ref_masked = oracle.split(*cpu(x, mask))
    assert_exact(visible, ref_visible, "visible")
    assert_exact(masked, ref_masked, "masked")
    assert visible.shape == (B, L - n, D) and masked.shape == (B, n, D)


@pytest.mark.parametrize("backend", backends_of("restore_tokens"))
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("case", CASES, ids=cid)
def test_restore(case, dtype, backend):
    B, L, n, D = case
    mask, visible, masked = on(backend, oracle.random_mask(B, L, n), data((B, L - n, D), dtype), data((B, n, D), dtype))
    out = forced("restore_tokens", backend, visible, masked, mask)
    assert_exact(out, oracle.restore(*cpu(visible, masked, mask)), f"restore {cid(case)}")


@pytest.mark.parametrize("backend", backends_of("split_tokens"))
@pytest.mark.parametrize(
    "layout", ["x_strided", "x_padded", "x_transposed", "x_last_dim_strided", "mask_t", "mask_strided", "mask_padded", "mask_expanded"]
)
def test_split_restore_non_contiguous(layout, backend):
    B, L, n, D = 3, 12, 5, 61
    x, mask = on(backend, data((B, L, D)), oracle.random_mask(B, L, n))
    if layout == "mask_expanded":
        mask = mask[:1].expand(B, L).clone()
    what, kind = layout.split("_", 1)
    if what == "x":
        x = DATA_LAYOUTS[kind](x)
    else:
        mask = MASK_LAYOUTS[kind](mask)
    ref_visible, ref_masked = oracle.split(*cpu(x, mask))
    visible, masked = forced("split_tokens", backend, x, mask)
    assert_exact(visible, ref_visible, f"visible {layout}")
    assert_exact(masked, ref_masked, f"masked {layout}")
    # restore from non-contiguous pieces of the same layout
    v_in, m_in = on(backend, ref_visible, ref_masked)
    if what == "x":
        v_in, m_in = DATA_LAYOUTS[kind](v_in), DATA_LAYOUTS[kind](m_in)
    out = forced("restore_tokens", backend, v_in, m_in, mask)
    assert_exact(out, oracle.restore(ref_visible, ref_masked, mask.cpu()), f"restore {layout}")
    assert_exact(out, x.contiguous(), f"round trip {layout}")


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("case", CASES, ids=cid)
def test_split_restore_round_trip(case, dtype):
    B, L, n, D = case
    x = data((B, L, D), dtype)
    mask = oracle.random_mask(B, L, n)
    visible, masked = K.split_tokens(x, mask)
    assert_exact(K.restore_tokens(visible, masked, mask), x, "restore(split(x))")
    v2, m2 = K.split_tokens(K.restore_tokens(visible, masked, mask), mask, n)
    assert_exact(v2, visible, "split(restore(v, m)) visible")
    assert_exact(m2, masked, "split(restore(v, m)) masked")


def test_split_agrees_with_mask_to_index_and_gather():
    B, L, n, D = 3, 15, 6, 8
    x = data((B, L, D))
    mask = oracle.random_mask(B, L, n)
    visible, masked = K.split_tokens(x, mask, n)
    assert_exact(masked, K.gather_tokens(x, K.mask_to_index(mask, n)))
    assert_exact(visible, K.gather_tokens(x, K.mask_to_index(~mask, L - n)))


# merge_cache.

# (B, L, nf, nc, D): either side empty, both empty, every D.
MERGE_CASES = [
    (1, 1, 0, 0, 3),
    (1, 1, 1, 0, 1),
    (1, 1, 0, 1, 8),
    (3, 9, 0, 5, 8),
    (3, 9, 5, 0, 61),
    (3, 9, 4, 5, 3),
    (3, 20, 6, 3, 1024),
    (1, 40, 1, 17, 61),
]


def mid(c):
    return "B{}-L{}-nf{}-nc{}-D{}".format(*c)


def disjoint_indices(B, L, nf, nc):
    fresh, cached = [], []
    for _ in range(B):
        perm = torch.randperm(L).tolist()
        fresh.append(sorted(perm[:nf]))
        cached.append(sorted(perm[nf : nf + nc]))
    return (
        torch.tensor(fresh, dtype=torch.int64).reshape(B, nf),
        torch.tensor(cached, dtype=torch.int64).reshape(B, nc),
    )


@pytest.mark.parametrize("backend", backends_of("merge_cache"))
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("case", MERGE_CASES, ids=mid)
def test_merge_cache(case, dtype, backend):
    B, L, nf, nc, D = case
    fi, ci = disjoint_indices(B, L, nf, nc)
    args = on(backend, data((B, nf, D), dtype), fi, data((B, nc, D), dtype), ci)
    out = forced("merge_cache", backend, *args)
    assert_exact(out, oracle.merge(*cpu(*args)), f"merge {mid(case)}")
    assert out.shape == (B, nf + nc, D)


MERGE_LAYOUTS = {
    "fresh_strided": dict(fresh=helpers.strided),
    "fresh_padded": dict(fresh=helpers.padded),
    "cached_transposed": dict(cached=transposed_bl),
    "cached_padded": dict(cached=helpers.padded),
    "fresh_index_t": dict(fresh_index=index_t),
    "cached_index_padded": dict(cached_index=helpers.padded),
    "cached_index_strided": dict(cached_index=helpers.strided),
    "fresh_last_dim_strided": dict(fresh=DATA_LAYOUTS["last_dim_strided"]),
    "all_strided": dict.fromkeys(["fresh", "fresh_index", "cached", "cached_index"], helpers.strided),
}


@pytest.mark.parametrize("backend", backends_of("merge_cache"))
@pytest.mark.parametrize("layout", list(MERGE_LAYOUTS))
def test_merge_cache_non_contiguous(layout, backend):
    B, L, nf, nc, D = 3, 16, 5, 4, 61
    fi, ci = disjoint_indices(B, L, nf, nc)
    values = on(backend, data((B, nf, D)), fi, data((B, nc, D)), ci)
    args = dict(zip(["fresh", "fresh_index", "cached", "cached_index"], values))
    for k, fn in MERGE_LAYOUTS[layout].items():
        args[k] = fn(args[k])
    out = forced("merge_cache", backend, *args.values())
    assert_exact(out, oracle.merge(*cpu(*args.values())), f"merge {layout}")


@pytest.mark.parametrize("case", [(1, 1, 0), (3, 9, 4), (3, 12, 0), (3, 12, 12), (2, 30, 11)], ids=lambda c: "B{}-L{}-nf{}".format(*c))
def test_merge_cache_of_split_parts_is_x(case):
    """Partition all L positions into fresh and cached, gather both from x: their merge is x."""
    B, L, nf = case
    D = 61
    x = data((B, L, D))
    mask = oracle.random_mask(B, L, nf)  # True = fresh
    fi, ci = K.mask_to_index(mask, nf), K.mask_to_index(~mask, L - nf)
    fresh, cached = K.gather_tokens(x, fi), K.gather_tokens(x, ci)
    assert_exact(K.merge_cache(fresh, fi, cached, ci), x, "merge(fresh, cached)")
    assert_exact(K.merge_cache(cached, ci, fresh, fi), x, "merge(cached, fresh)")
    # split_tokens gives the same parts (visible = cached here)
    visible, masked = K.split_tokens(x, mask, nf)
    assert_exact(K.merge_cache(masked, fi, visible, ci), x, "merge(split parts)")


def test_auto_backend_matches_oracle():
    """backend=None (auto) on every op."""
    B, L, n, D = 3, 10, 4, 61
    x = data((B, L, D))
    mask = oracle.random_mask(B, L, n)
    index = oracle.mask_to_index(mask)
    assert_exact(K.mask_to_index(mask), index)
    assert_exact(K.gather_tokens(x, index), oracle.gather(x, index))
    src = data((B, n, D))
    assert_exact(K.scatter_tokens(x, index, src), oracle.scatter(x, index, src))
    base = x.clone()
    assert_exact(K.scatter_tokens_(base, index, src), oracle.scatter(x, index, src))
    v, m = K.split_tokens(x, mask)
    rv, rm = oracle.split(x, mask)
    assert_exact(v, rv)
    assert_exact(m, rm)
    assert_exact(K.restore_tokens(rv, rm, mask), x)
    fi, ci = disjoint_indices(B, L, 3, 5)
    f, c = data((B, 3, D)), data((B, 5, D))
    assert_exact(K.merge_cache(f, fi, c, ci), oracle.merge(f, fi, c, ci))


# Gradients: fp64 gradcheck of the reference backend in every differentiable input, and every kernel
# backend's backward (one-launch backward kernels) equal to the reference's.

GRAD_CASES = [(2, 5, 2, 3), (2, 4, 0, 3), (1, 4, 4, 2), (1, 1, 1, 1)]


def _gradcheck(f, inputs):
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("case", GRAD_CASES, ids=cid)
def test_gradcheck_gather(case):
    B, L, n, D = case
    x = data((B, L, D), torch.float64).requires_grad_()
    index = oracle.random_index(B, L, n)
    _gradcheck(lambda x: K.gather_tokens(x, index, backend="reference"), (x,))


@pytest.mark.parametrize("wrt", ["base", "src", "both"])
@pytest.mark.parametrize("case", GRAD_CASES, ids=cid)
def test_gradcheck_scatter(case, wrt):
    B, L, n, D = case
    base = data((B, L, D), torch.float64).requires_grad_(wrt in ("base", "both"))
    src = data((B, n, D), torch.float64).requires_grad_(wrt in ("src", "both"))
    index = oracle.random_index(B, L, n)
    _gradcheck(lambda b, s: K.scatter_tokens(b, index, s, backend="reference"), (base, src))


def test_scatter_gradients_values():
    """d base is grad with the scattered rows zeroed; d src is grad at the scattered rows."""
    B, L, n, D = 2, 6, 3, 4
    base = data((B, L, D)).requires_grad_()
    src = data((B, n, D)).requires_grad_()
    index = oracle.random_index(B, L, n)
    grad = data((B, L, D))
    gb, gs = torch.autograd.grad(K.scatter_tokens(base, index, src), (base, src), grad)
    assert_exact(gb, oracle.scatter(grad, index, torch.zeros(B, n, D)))
    assert_exact(gs, oracle.gather(grad, index))


@pytest.mark.parametrize("case", GRAD_CASES, ids=cid)
def test_gradcheck_split(case):
    B, L, n, D = case
    x = data((B, L, D), torch.float64).requires_grad_()
    mask = oracle.random_mask(B, L, n)
    _gradcheck(lambda x: K.split_tokens(x, mask, n, backend="reference"), (x,))


@pytest.mark.parametrize("case", GRAD_CASES, ids=cid)
def test_gradcheck_restore(case):
    B, L, n, D = case
    mask = oracle.random_mask(B, L, n)
    visible = data((B, L - n, D), torch.float64).requires_grad_()
    masked = data((B, n, D), torch.float64).requires_grad_()
    _gradcheck(lambda v, m: K.restore_tokens(v, m, mask, backend="reference"), (visible, masked))


@pytest.mark.parametrize("case", [(2, 6, 2, 3, 3), (2, 5, 0, 3, 2), (1, 4, 4, 0, 2), (1, 3, 1, 1, 1)], ids=mid)
def test_gradcheck_merge_cache(case):
    B, L, nf, nc, D = case
    fi, ci = disjoint_indices(B, L, nf, nc)
    fresh = data((B, nf, D), torch.float64).requires_grad_()
    cached = data((B, nc, D), torch.float64).requires_grad_()
    _gradcheck(lambda f, c: K.merge_cache(f, fi, c, ci, backend="reference"), (fresh, cached))


def test_merge_cache_gradient_one_side():
    """Only one side requires grad: its gradient is right and the other gets none."""
    B, L, nf, nc, D = 2, 9, 3, 4, 5
    fi, ci = disjoint_indices(B, L, nf, nc)
    fresh = data((B, nf, D)).requires_grad_()
    cached = data((B, nc, D))
    grad = data((B, nf + nc, D))
    (gf,) = torch.autograd.grad(K.merge_cache(fresh, fi, cached, ci), (fresh,), grad)
    # merged row r holds fresh row j at the rank of fi[b, j] in the union
    union = torch.cat([fi, ci], 1).sort(1).values
    ranks = torch.stack([torch.tensor([union[b].tolist().index(p) for p in fi[b].tolist()]) for b in range(B)])
    assert_exact(gf, oracle.gather(grad, ranks))


@pytest.mark.parametrize("backend", kernels_of(*TOKEN_OPS))
@pytest.mark.parametrize("case", [(2, 7, 0, 8), (2, 7, 7, 3), (1, 1, 1, 61), (2, 13, 5, 61), (1, 9, 4, 1024), (3, 10, 3, 8)],
                         ids=cid)
def test_every_backward_matches_the_reference(case, backend):
    """Gradients through each differentiable op, on strided inputs, equal the reference backend's
    (which the gradchecks above check)."""
    B, L, n, D = case
    mask = oracle.random_mask(B, L, n)
    index, visible_index = oracle.mask_to_index(mask), oracle.mask_to_index(~mask)
    x, src, weights = data((B, L, D)), data((B, n, D)), data((B, L, D))
    x, src, mask, index, visible_index, weights = (helpers.strided(t) for t in on(
        backend, x, src, mask, index, visible_index, weights))

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
        assert_exact(got, want, f"d{name} {backend} {cid(case)}")


# opcheck (torch.library): schema, fake kernel, autograd registration, AOT dispatch, on every backend,
# strided inputs.


def _opcheck_args(name, backend):
    B, L, n, D = 2, 7, 3, 5
    mask = oracle.random_mask(B, L, n)
    fi, ci = disjoint_indices(B, L, 2, 4)
    x, src, visible, fresh, cached, mask, index, fi, ci = (helpers.strided(t) for t in on(
        backend, data((B, L, D)), data((B, n, D)), data((B, L - n, D)), data((B, 2, D)), data((B, 4, D)), mask,
        oracle.mask_to_index(mask), fi, ci))
    grad = lambda t: t.requires_grad_()  # noqa: E731
    return {
        "mask_to_index": (mask, n),
        "gather_tokens": (grad(x), index),
        "scatter_tokens": (grad(x), index, grad(src)),
        "scatter_tokens_": (x.detach().clone(), index, src.detach()),
        "split_tokens": (grad(x), mask, n),
        "restore_tokens": (grad(visible), grad(src), mask),
        "merge_cache": (grad(fresh), fi, grad(cached), ci),
    }[name] + (backend,)


@pytest.mark.parametrize("name,backend", op_backends(TOKEN_OPS))
def test_opcheck(name, backend):
    torch.library.opcheck(getattr(torch.ops.enat, name).default, _opcheck_args(name, backend))


@pytest.mark.parametrize("name", ["gather_tokens", "scatter_tokens", "split_tokens", "restore_tokens", "merge_cache"])
def test_opcheck_empty(name):
    """n = 0 (or an empty side) through opcheck."""
    B, L, D = 2, 4, 3
    x = data((B, L, D)).requires_grad_()
    empty_index = torch.empty(B, 0, dtype=torch.int64)
    mask = torch.zeros(B, L, dtype=torch.bool)
    args = {
        "gather_tokens": (x, empty_index, "reference"),
        "scatter_tokens": (x, empty_index, data((B, 0, D)).requires_grad_(), "reference"),
        "split_tokens": (x, mask, 0, "reference"),
        "restore_tokens": (x, data((B, 0, D)).requires_grad_(), mask, "reference"),
        "merge_cache": (data((B, 0, D)).requires_grad_(), empty_index, x, torch.arange(L).expand(B, L).contiguous(), "reference"),
    }[name]
    torch.library.opcheck(getattr(torch.ops.enat, name).default, args)


# Bad input (docs/OPS.md, Bad input): a ValueError or TypeError naming the argument. Valid baseline:
# B=2, L=6, n=3, D=4.

B0, L0, N0, D0 = 2, 6, 3, 4
IDX0 = [[0, 2, 5], [1, 3, 4]]


def _valid():
    x = data((B0, L0, D0))
    index = torch.tensor(IDX0)
    mask = torch.zeros(B0, L0, dtype=torch.bool)
    mask[0, [0, 2, 5]] = True
    mask[1, [1, 3, 4]] = True
    return dict(
        x=x,
        index=index,
        base=x.clone(),
        src=data((B0, N0, D0)),
        mask=mask,
        count=N0,
        visible=data((B0, L0 - N0, D0)),
        masked=data((B0, N0, D0)),
        fresh=data((B0, 2, D0)),
        fresh_index=torch.tensor([[0, 5], [2, 3]]),
        cached=data((B0, 3, D0)),
        cached_index=torch.tensor([[1, 2, 4], [0, 4, 5]]),
    )


def _call(op, args, **extra):
    a = {**args, **extra}
    kw = {"backend": a["backend"]} if "backend" in a else {}
    if op == "mask_to_index":
        return K.mask_to_index(a["mask"], a["count"], **kw)
    if op == "gather_tokens":
        return K.gather_tokens(a["x"], a["index"], **kw)
    if op == "scatter_tokens":
        return K.scatter_tokens(a["base"], a["index"], a["src"], **kw)
    if op == "scatter_tokens_":
        return K.scatter_tokens_(a["base"], a["index"], a["src"], **kw)
    if op == "split_tokens":
        return K.split_tokens(a["x"], a["mask"], a["count"], **kw)
    if op == "restore_tokens":
        return K.restore_tokens(a["visible"], a["masked"], a["mask"], **kw)
    if op == "merge_cache":
        return K.merge_cache(a["fresh"], a["fresh_index"], a["cached"], a["cached_index"], **kw)
    raise AssertionError(op)


def _unequal_rows_mask():
    m = torch.zeros(B0, L0, dtype=torch.bool)
    m[0, :3] = True
    m[1, :2] = True
    return m


INDEX_BAD = {
    "index_rank1": (dict(index=lambda t: t[0]), ValueError, r"index.*\[3\]"),
    "index_rank3": (dict(index=lambda t: t[..., None]), ValueError, r"index.*\[2, 3, 1\]"),
    "index_int32": (dict(index=lambda t: t.int()), TypeError, r"index.*int32"),
    "index_float": (dict(index=lambda t: t.float()), TypeError, "index"),
    "index_batch": (dict(index=lambda t: t[:1]), ValueError, r"index.*\[1, 3\]"),
    "index_out_of_range": (dict(index=lambda t: torch.tensor([[0, 2, 6], [1, 3, 4]])), ValueError, "index"),
    "index_far_out_of_range": (dict(index=lambda t: torch.tensor([[0, 2, 10**12], [1, 3, 4]])), ValueError, "index"),
    "index_negative": (dict(index=lambda t: torch.tensor([[-1, 2, 5], [1, 3, 4]])), ValueError, "index"),
    "index_descending": (dict(index=lambda t: torch.tensor([[0, 2, 5], [4, 3, 1]])), ValueError, "index"),
    "index_duplicate": (dict(index=lambda t: torch.tensor([[0, 2, 2], [1, 3, 4]])), ValueError, "index"),
    "index_not_tensor": (dict(index=lambda t: t.tolist()), TypeError, "index"),
    "index_device": (dict(index=lambda t: t.to("meta")), ValueError, "index"),
}

BAD_INPUTS = {
    "gather_tokens": {
        **INDEX_BAD,
        "x_rank2": (dict(x=lambda t: t[0]), ValueError, r"x.*\[6, 4\]"),
        "x_rank4": (dict(x=lambda t: t[None]), ValueError, r"x.*\[1, 2, 6, 4\]"),
        "x_not_tensor": (dict(x=lambda t: t.numpy()), TypeError, "x"),
        "backend": (dict(backend="fast"), ValueError, "backend"),
    },
    "scatter_tokens": {
        **INDEX_BAD,
        "base_rank2": (dict(base=lambda t: t[0]), ValueError, r"base.*\[6, 4\]"),
        "src_rank2": (dict(src=lambda t: t[0]), ValueError, r"src.*\[3, 4\]"),
        "src_batch": (dict(src=lambda t: t[:1]), ValueError, r"src.*\[1, 3, 4\]"),
        "src_n": (dict(src=lambda t: t[:, :2]), ValueError, r"src.*\[2, 2, 4\]"),
        "src_D": (dict(src=lambda t: t[..., :3]), ValueError, r"src.*\[2, 3, 3\]"),
        "src_dtype": (dict(src=lambda t: t.double()), TypeError, r"src.*float64"),
        "src_device": (dict(src=lambda t: t.to("meta")), ValueError, "src"),
        "src_not_tensor": (dict(src=1.0), TypeError, "src"),
        "backend": (dict(backend="Triton"), ValueError, "backend"),
    },
    "mask_to_index": {
        "mask_uint8": (dict(mask=lambda t: t.to(torch.uint8)), TypeError, r"mask.*uint8"),
        "mask_float": (dict(mask=lambda t: t.float()), TypeError, "mask"),
        "mask_rank1": (dict(mask=lambda t: t[0]), ValueError, r"mask.*\[6\]"),
        "mask_rank3": (dict(mask=lambda t: t[None]), ValueError, r"mask.*\[1, 2, 6\]"),
        "mask_not_tensor": (dict(mask=lambda t: t.tolist()), TypeError, "mask"),
        "rows_differ": (dict(mask=lambda t: _unequal_rows_mask(), count=None), ValueError, "mask"),
        "count_mismatch": (dict(count=2), ValueError, "count = 2"),
        "count_mismatch_rows_differ": (dict(mask=lambda t: _unequal_rows_mask(), count=3), ValueError, "mask must have count = 3"),
        "count_too_big": (dict(count=7), ValueError, "count"),
        "count_negative": (dict(count=-1), ValueError, "count"),
        "count_float": (dict(count=3.0), TypeError, "count"),
        "count_bool": (dict(count=True), TypeError, "count"),
        "count_tensor": (dict(count=torch.tensor([3, 3])), TypeError, "count"),
        "backend": (dict(backend="gpu"), ValueError, "backend"),
    },
    "split_tokens": {
        "x_rank2": (dict(x=lambda t: t[0]), ValueError, r"x.*\[6, 4\]"),
        "mask_uint8": (dict(mask=lambda t: t.to(torch.uint8)), TypeError, "mask"),
        "mask_rank1": (dict(mask=lambda t: t[0]), ValueError, "mask"),
        "mask_L": (dict(mask=lambda t: torch.cat([t, t], 1)), ValueError, r"mask.*\[2, 12\]"),
        "mask_B": (dict(mask=lambda t: t[:1]), ValueError, r"mask.*\[1, 6\]"),
        "mask_device": (dict(mask=lambda t: t.to("meta")), ValueError, "mask"),
        "rows_differ": (dict(mask=lambda t: _unequal_rows_mask(), count=None), ValueError, "mask"),
        "n_masked_mismatch": (dict(count=4), ValueError, "n_masked = 4"),
        "n_masked_too_big": (dict(count=7), ValueError, "n_masked"),
        "n_masked_negative": (dict(count=-2), ValueError, "n_masked"),
        "n_masked_float": (dict(count=1.5), TypeError, "n_masked"),
        "x_not_tensor": (dict(x=None), TypeError, "x"),
        "backend": (dict(backend="cpu_kernels"), ValueError, "backend"),
    },
    "restore_tokens": {
        "visible_rank2": (dict(visible=lambda t: t[0]), ValueError, r"visible.*\[3, 4\]"),
        "masked_rank4": (dict(masked=lambda t: t[None]), ValueError, r"masked.*\[1, 2, 3, 4\]"),
        "mask_uint8": (dict(mask=lambda t: t.to(torch.uint8)), TypeError, "mask"),
        "mask_rank3": (dict(mask=lambda t: t[None]), ValueError, "mask"),
        "D_mismatch": (dict(masked=lambda t: t[..., :2]), ValueError, r"masked.*\[2, 3, 2\]"),
        "dtype_mismatch": (dict(masked=lambda t: t.half()), TypeError, r"masked.*float16"),
        "B_mismatch": (dict(visible=lambda t: t[:1]), ValueError, r"visible.*\[1, 3, 4\]"),
        "L_mismatch": (dict(visible=lambda t: t[:, :2]), ValueError, r"visible.*\[2, 2, 4\]"),
        "mask_count_mismatch": (dict(visible=lambda t: torch.cat([t, t[:, :1]], 1), masked=lambda t: t[:, :2]),
                                ValueError, "mask"),
        "rows_differ": (dict(mask=lambda t: _unequal_rows_mask()), ValueError, "mask"),
        "device": (dict(masked=lambda t: t.to("meta")), ValueError, "masked"),
        "not_tensor": (dict(visible=[1.0]), TypeError, "visible"),
        "backend": (dict(backend="cuda_graph"), ValueError, "backend"),
    },
    "merge_cache": {
        "fresh_rank2": (dict(fresh=lambda t: t[0]), ValueError, r"fresh.*\[2, 4\]"),
        "cached_rank4": (dict(cached=lambda t: t[None]), ValueError, r"cached.*\[1, 2, 3, 4\]"),
        "fresh_index_int32": (dict(fresh_index=lambda t: t.int()), TypeError, "fresh_index"),
        "cached_index_rank1": (dict(cached_index=lambda t: t[0]), ValueError, "cached_index"),
        "cached_index_len": (dict(cached_index=lambda t: t[:, :2]), ValueError, r"cached_index.*\[2, 2\]"),
        "fresh_index_batch": (dict(fresh_index=lambda t: t[:1]), ValueError, "fresh_index"),
        "overlap": (dict(cached_index=lambda t: torch.tensor([[1, 2, 5], [0, 4, 5]])), ValueError,
                    "fresh_index|cached_index"),
        "overlap_second_row": (dict(cached_index=lambda t: torch.tensor([[1, 2, 4], [0, 2, 5]])), ValueError,
                               "fresh_index|cached_index"),
        "fresh_index_descending": (dict(fresh_index=lambda t: torch.tensor([[5, 0], [2, 3]])), ValueError, "fresh_index"),
        "cached_index_duplicate": (dict(cached_index=lambda t: torch.tensor([[1, 1, 4], [0, 4, 5]])), ValueError,
                                   "cached_index"),
        "cached_index_negative": (dict(cached_index=lambda t: torch.tensor([[-3, 1, 4], [0, 4, 5]])), ValueError,
                                  "cached_index"),
        "D_mismatch": (dict(cached=lambda t: t[..., :1]), ValueError, r"cached.*\[2, 3, 1\]"),
        "B_mismatch": (dict(cached=lambda t: t[:1], cached_index=lambda t: t[:1]), ValueError, "cached"),
        "dtype_mismatch": (dict(cached=lambda t: t.double()), TypeError, r"cached.*float64"),
        "device": (dict(cached=lambda t: t.to("meta")), ValueError, "cached"),
        "index_device": (dict(fresh_index=lambda t: t.to("meta")), ValueError, "fresh_index"),
        "backend": (dict(backend="nope"), ValueError, "backend"),
    },
}
BAD_INPUTS["scatter_tokens_"] = BAD_INPUTS["scatter_tokens"]

BAD_CASES = [(op, name) for op in TOKEN_OPS for name in BAD_INPUTS[op]]


@pytest.mark.parametrize("op,name", BAD_CASES, ids=[f"{op}-{name}" for op, name in BAD_CASES])
def test_bad_input(op, name):
    changes, exc, pattern = BAD_INPUTS[op][name]
    args = _valid()
    extra = {}
    for k, v in changes.items():
        if k == "backend":
            extra[k] = v
        else:
            args[k] = v(args[k]) if callable(v) else v
    with pytest.raises(exc, match=pattern):
        _call(op, args, **extra)


def test_bad_input_baseline_is_valid():
    """The baseline of test_bad_input is accepted by every op (so each failure there is the change's)."""
    for op in TOKEN_OPS:
        _call(op, _valid())


def test_scatter_inplace_bad_input_leaves_base_untouched():
    args = _valid()
    before = args["base"].clone()
    with pytest.raises(ValueError, match="index"):
        K.scatter_tokens_(args["base"], torch.tensor([[0, 2, 6], [1, 3, 4]]), args["src"])
    assert torch.equal(args["base"], before)


def test_scatter_inplace_refuses_expanded_base():
    """In-place writes into a stride-0 (expanded) base would alias rows: a clear error naming base."""
    base, index, src = _scatter_inputs("base_expanded")
    with pytest.raises((ValueError, TypeError), match="base"):
        K.scatter_tokens_(base, index, src)


@pytest.mark.parametrize("which", ["base", "src", "both"])
def test_scatter_inplace_refuses_requires_grad(which):
    base, index, src = _scatter_inputs("contiguous", B=2, L=5, n=2, D=3)
    if which in ("base", "both"):
        base.requires_grad_()
    if which in ("src", "both"):
        src.requires_grad_()
    with pytest.raises(ValueError, match="requires grad"):
        K.scatter_tokens_(base, index, src)


@pytest.mark.parametrize("op,backend", op_backends(["gather_tokens", "scatter_tokens", "scatter_tokens_"], kernels_of))
@pytest.mark.parametrize("bad", [[[0, 5], [1, 2]], [[0, 1], [3, 3]], [[2, 1], [0, 4]], [[-1, 2], [0, 1]]],
                         ids=["out_of_range", "duplicate", "descending", "negative"])
def test_bad_index_is_caught_before_the_kernel(op, backend, bad, monkeypatch):
    """Bad index values raise ValueError with a kernel backend forced (CPU tensors are always checked;
    CUDA tensors in debug mode), and the kernel never runs."""
    if backends.device_for(backend) == "cuda":
        monkeypatch.setenv("ENAT_KERNELS_DEBUG", "1")
    x, src, index = on(backend, data((2, 5, 3)), data((2, 2, 3)), torch.tensor(bad))
    before = x.clone()
    with pytest.raises(ValueError, match="index"):
        getattr(K, op)(x, index, *([src] if op != "gather_tokens" else []), backend=backend)
    assert torch.equal(x, before)


@helpers.needs_triton
def test_forced_triton_on_a_dtype_it_does_not_move_says_why():
    x, index = on("triton", torch.ones(2, 5, 3, dtype=torch.bool), oracle.random_index(2, 5, 2))
    with pytest.raises(BackendUnavailableError, match="do not move torch.bool"):
        K.gather_tokens(x, index, backend="triton")

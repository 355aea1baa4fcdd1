"""Critical-token movement ops against the oracle (tests/oracle.py): exact equality (docs/OPS.md: token
movement ops are exact), awkward shapes (n = 0, n = L, L = 1, D in {1, 3, 8, 61, 1024}),
non-contiguous inputs, NaN-filled memory past the logical end, gradients, opcheck and bad input.

The reference backend runs on CPU tensors; the Triton kernels run on CPU tensors in Triton's
interpreter here (tests/conftest.py), or on the GPU where there is one (helpers.triton_device()).
"""

import pytest
import torch

import enat_kernels.ops as K
from enat_kernels.backends import BackendUnavailableError

import helpers
import oracle

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


def data(shape, dtype=torch.float32, device="cpu"):
    return oracle.random_tensor(shape, dtype).to(device)


def no_nan(t):
    return not (t.is_floating_point() and torch.isnan(t).any())


def assert_exact(out, ref, what=""):
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert out.dtype == ref.dtype, f"{what}: dtype {out.dtype} != {ref.dtype}"
    assert no_nan(out), f"{what}: NaN in the result (an out-of-bounds read?)"
    assert torch.equal(out.cpu(), ref.cpu()), f"{what}: values differ from the oracle"


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


# mask_to_index.

MASK_CASES = [(1, 1, 0), (1, 1, 1), (3, 7, 0), (3, 7, 7), (3, 13, 5), (1, 64, 17), (2, 1000, 3)]


@pytest.mark.parametrize("given", [False, True], ids=["count_none", "count_given"])
@pytest.mark.parametrize("case", MASK_CASES, ids=lambda c: "B{}-L{}-n{}".format(*c))
def test_mask_to_index(case, given):
    B, L, n = case
    mask = oracle.random_mask(B, L, n)
    out = K.mask_to_index(mask, n if given else None, backend="reference")
    assert out.dtype == torch.int64 and out.shape == (B, n)
    assert_exact(out, oracle.mask_to_index(mask))


MASK_LAYOUTS = {
    "t": lambda m: m.t().contiguous().t(),
    "strided": helpers.strided,  # the gaps hold True
    "padded": helpers.padded,  # True past the end
    "expanded": expanded_rows,
    "sliced": lambda m: torch.cat([m, ~m], dim=1)[:, : m.shape[1]],
}


@pytest.mark.parametrize("given", [False, True], ids=["count_none", "count_given"])
@pytest.mark.parametrize("layout", list(MASK_LAYOUTS))
def test_mask_to_index_non_contiguous(layout, given):
    B, L, n = 3, 11, 4
    mask = oracle.random_mask(B, L, n)
    if layout == "expanded":
        mask = mask[:1].expand(B, L).clone()
    view = MASK_LAYOUTS[layout](mask)
    assert torch.equal(view, mask)
    out = K.mask_to_index(view, n if given else None)
    assert_exact(out, oracle.mask_to_index(mask))


# gather_tokens.


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("case", CASES, ids=cid)
def test_gather(case, dtype):
    B, L, n, D = case
    x = data((B, L, D), dtype)
    index = oracle.random_index(B, L, n)
    out = K.gather_tokens(x, index, backend="reference")
    assert_exact(out, oracle.gather(x, index), f"gather {cid(case)}")


@pytest.mark.parametrize("index_layout", [*INDEX_LAYOUTS, "expanded"])
@pytest.mark.parametrize("x_layout", [*DATA_LAYOUTS, "expanded"])
def test_gather_non_contiguous(x_layout, index_layout):
    B, L, n, D = 3, 10, 4, 61
    x = data((B, L, D))
    index = oracle.random_index(B, L, n)
    if x_layout == "expanded":
        x = expanded_rows(x)
    else:
        x = DATA_LAYOUTS[x_layout](x)
    if index_layout == "expanded":
        index = expanded_rows(index)
    else:
        index = INDEX_LAYOUTS[index_layout](index)
    out = K.gather_tokens(x, index)
    assert_exact(out, oracle.gather(x, index), f"gather x:{x_layout} index:{index_layout}")


# scatter_tokens (out of place) and scatter_tokens_ (in place).


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("case", CASES, ids=cid)
def test_scatter(case, dtype):
    B, L, n, D = case
    base = data((B, L, D), dtype)
    src = data((B, n, D), dtype)
    index = oracle.random_index(B, L, n)
    before = base.clone()
    out = K.scatter_tokens(base, index, src, backend="reference")
    assert_exact(out, oracle.scatter(base, index, src), f"scatter {cid(case)}")
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
    fns = SCATTER_LAYOUTS.get(layout, {})
    args = dict(base=base, index=index, src=src)
    for name, fn in fns.items():
        args[name] = fn(args[name])
    return args["base"], args["index"], args["src"]


@pytest.mark.parametrize("layout", list(SCATTER_LAYOUTS))
def test_scatter_non_contiguous(layout):
    base, index, src = _scatter_inputs(layout)
    out = K.scatter_tokens(base, index, src)
    assert_exact(out, oracle.scatter(base, index, src), f"scatter {layout}")


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("case", CASES, ids=cid)
def test_scatter_inplace(case, dtype):
    B, L, n, D = case
    base = data((B, L, D), dtype)
    src = data((B, n, D), dtype)
    index = oracle.random_index(B, L, n)
    expected = oracle.scatter(base, index, src)
    ptr = base.data_ptr()
    out = K.scatter_tokens_(base, index, src, backend="reference")
    assert out is base, "scatter_tokens_ must return base itself"
    assert base.data_ptr() == ptr
    assert_exact(base, expected, f"scatter_ {cid(case)}")


def _storage_outside(view):
    """The elements of view's storage that the view does not cover (the NaN gaps and tail)."""
    full = view._base if view._base is not None else view
    flat = full.flatten()
    covered = torch.zeros(flat.numel(), dtype=torch.bool)
    offs = torch.as_strided(
        torch.arange(flat.numel()), view.shape, view.stride(), view.storage_offset() - full.storage_offset()
    )
    covered[offs.flatten()] = True
    return flat[~covered]


@pytest.mark.parametrize(
    "layout", ["base_strided", "base_padded", "base_transposed", "base_last_dim_strided", "src_strided", "index_t", "all_strided"]
)
def test_scatter_inplace_non_contiguous(layout):
    base, index, src = _scatter_inputs(layout)
    outside = _storage_outside(base).clone()
    expected = oracle.scatter(base, index, src)
    out = K.scatter_tokens_(base, index, src)
    assert out is base
    assert_exact(base, expected, f"scatter_ {layout}")
    after = _storage_outside(base)
    assert torch.equal(after.isnan(), outside.isnan()) and torch.equal(
        after.nan_to_num(0), outside.nan_to_num(0)
    ), "scatter_tokens_ wrote outside base's view"


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


# split_tokens and restore_tokens.


@pytest.mark.parametrize("given", [False, True], ids=["n_none", "n_given"])
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("case", CASES, ids=cid)
def test_split(case, dtype, given):
    B, L, n, D = case
    x = data((B, L, D), dtype)
    mask = oracle.random_mask(B, L, n)
    visible, masked = K.split_tokens(x, mask, n if given else None, backend="reference")
    ref_visible, ref_masked = oracle.split(x, mask)
    assert_exact(visible, ref_visible, "visible")
    assert_exact(masked, ref_masked, "masked")
    assert visible.shape == (B, L - n, D) and masked.shape == (B, n, D)


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("case", CASES, ids=cid)
def test_restore(case, dtype):
    B, L, n, D = case
    mask = oracle.random_mask(B, L, n)
    visible = data((B, L - n, D), dtype)
    masked = data((B, n, D), dtype)
    out = K.restore_tokens(visible, masked, mask, backend="reference")
    assert_exact(out, oracle.restore(visible, masked, mask), f"restore {cid(case)}")


@pytest.mark.parametrize(
    "layout", ["x_strided", "x_padded", "x_transposed", "x_last_dim_strided", "mask_t", "mask_strided", "mask_padded", "mask_expanded"]
)
def test_split_restore_non_contiguous(layout):
    B, L, n, D = 3, 12, 5, 61
    x = data((B, L, D))
    mask = oracle.random_mask(B, L, n)
    if layout == "mask_expanded":
        mask = mask[:1].expand(B, L).clone()
    what, kind = layout.split("_", 1)
    if what == "x":
        x = DATA_LAYOUTS[kind](x)
    else:
        mask = MASK_LAYOUTS[kind](mask)
    ref_visible, ref_masked = oracle.split(x, mask)
    visible, masked = K.split_tokens(x, mask)
    assert_exact(visible, ref_visible, f"visible {layout}")
    assert_exact(masked, ref_masked, f"masked {layout}")
    # restore from non-contiguous pieces of the same layout
    if what == "x":
        v_in, m_in = DATA_LAYOUTS[kind](ref_visible), DATA_LAYOUTS[kind](ref_masked)
    else:
        v_in, m_in = ref_visible, ref_masked
    out = K.restore_tokens(v_in, m_in, mask)
    assert_exact(out, oracle.restore(ref_visible, ref_masked, mask), f"restore {layout}")
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


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("case", MERGE_CASES, ids=mid)
def test_merge_cache(case, dtype):
    B, L, nf, nc, D = case
    fi, ci = disjoint_indices(B, L, nf, nc)
    fresh, cached = data((B, nf, D), dtype), data((B, nc, D), dtype)
    out = K.merge_cache(fresh, fi, cached, ci, backend="reference")
    assert_exact(out, oracle.merge(fresh, fi, cached, ci), f"merge {mid(case)}")
    assert out.shape == (B, nf + nc, D)


@pytest.mark.parametrize(
    "layout",
    ["fresh_strided", "fresh_padded", "cached_transposed", "cached_padded", "fresh_index_t", "cached_index_padded",
     "cached_index_strided", "fresh_last_dim_strided", "all_strided"],
)
def test_merge_cache_non_contiguous(layout):
    B, L, nf, nc, D = 3, 16, 5, 4, 61
    fi, ci = disjoint_indices(B, L, nf, nc)
    args = dict(fresh=data((B, nf, D)), fresh_index=fi, cached=data((B, nc, D)), cached_index=ci)
    fns = {
        "fresh_strided": dict(fresh=helpers.strided),
        "fresh_padded": dict(fresh=helpers.padded),
        "cached_transposed": dict(cached=transposed_bl),
        "cached_padded": dict(cached=helpers.padded),
        "fresh_index_t": dict(fresh_index=index_t),
        "cached_index_padded": dict(cached_index=helpers.padded),
        "cached_index_strided": dict(cached_index=helpers.strided),
        "fresh_last_dim_strided": dict(fresh=DATA_LAYOUTS["last_dim_strided"]),
        "all_strided": {k: helpers.strided for k in args},
    }[layout]
    for k, fn in fns.items():
        args[k] = fn(args[k])
    out = K.merge_cache(**args)
    assert_exact(out, oracle.merge(*args.values()), f"merge {layout}")


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


# Gradients (fp64 gradcheck, every differentiable input).

GRAD_CASES = [(2, 5, 2, 3), (2, 4, 0, 3), (1, 4, 4, 2), (1, 1, 1, 1)]


def gid(c):
    return "B{}-L{}-n{}-D{}".format(*c)


def _gradcheck(f, inputs):
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("case", GRAD_CASES, ids=gid)
def test_gradcheck_gather(case):
    B, L, n, D = case
    x = data((B, L, D), torch.float64).requires_grad_()
    index = oracle.random_index(B, L, n)
    _gradcheck(lambda x: K.gather_tokens(x, index, backend="reference"), (x,))


@pytest.mark.parametrize("wrt", ["base", "src", "both"])
@pytest.mark.parametrize("case", GRAD_CASES, ids=gid)
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


@pytest.mark.parametrize("case", GRAD_CASES, ids=gid)
def test_gradcheck_split(case):
    B, L, n, D = case
    x = data((B, L, D), torch.float64).requires_grad_()
    mask = oracle.random_mask(B, L, n)
    _gradcheck(lambda x: K.split_tokens(x, mask, n, backend="reference"), (x,))


@pytest.mark.parametrize("case", GRAD_CASES, ids=gid)
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


# opcheck (torch.library): schema, fake kernel, autograd registration, AOT dispatch.


def _opcheck_args(name, requires_grad=True):
    B, L, n, D = 2, 7, 3, 5
    x = data((B, L, D)).requires_grad_(requires_grad)
    mask = oracle.random_mask(B, L, n)
    index = oracle.mask_to_index(mask)
    src = data((B, n, D)).requires_grad_(requires_grad)
    fi, ci = disjoint_indices(B, L, 2, 4)
    return {
        "mask_to_index": (mask, n, "reference"),
        "gather_tokens": (x, index, "reference"),
        "scatter_tokens": (x, index, src, "reference"),
        "scatter_tokens_": (x.detach().clone(), index, src.detach(), "reference"),
        "split_tokens": (x, mask, n, "reference"),
        "restore_tokens": (data((B, L - n, D)).requires_grad_(requires_grad), src, mask, "reference"),
        "merge_cache": (data((B, 2, D)).requires_grad_(requires_grad), fi, data((B, 4, D)).requires_grad_(requires_grad), ci, "reference"),
    }[name]


OPS = ["mask_to_index", "gather_tokens", "scatter_tokens", "scatter_tokens_", "split_tokens", "restore_tokens", "merge_cache"]


@pytest.mark.parametrize("name", OPS)
def test_opcheck(name):
    op = getattr(torch.ops.enat, name).default
    torch.library.opcheck(op, _opcheck_args(name))


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


# Bad input. Valid baseline: B=2, L=6, n=3, D=4.

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
        "backend": (dict(backend="cpu"), ValueError, "backend"),
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

BAD_CASES = [(op, name) for op in OPS for name in BAD_INPUTS[op]]


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
    for op in OPS:
        _call(op, _valid())


def test_scatter_inplace_bad_input_leaves_base_untouched():
    args = _valid()
    before = args["base"].clone()
    with pytest.raises(ValueError, match="index"):
        K.scatter_tokens_(args["base"], torch.tensor([[0, 2, 6], [1, 3, 4]]), args["src"])
    assert torch.equal(args["base"], before)


# Triton kernels (gather_tokens, scatter_tokens, scatter_tokens_) on helpers.triton_device():
# CPU tensors under the interpreter here. Grids stay tiny (B * ceil(n / BLOCK_N) programs).

TRITON_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "int64": torch.int64}
TRITON_CASES = [
    (1, 1, 0, 1),
    (1, 1, 1, 1),
    (2, 3, 3, 3),
    (1, 4, 4, 8),
    (2, 5, 2, 61),
    (1, 3, 2, 1024),
    (2, 4, 0, 8),
]
TRITON_LAYOUTS = ["contiguous", "strided", "padded", "index_t"]


def _triton_inputs(case, dtype, layout):
    B, L, n, D = case
    dev = helpers.triton_device()
    x = data((B, L, D), dtype, dev)
    src = data((B, n, D), dtype, dev)
    index = oracle.random_index(B, L, n).to(dev)
    if layout in ("strided", "padded"):  # rows and index both, with sentinels in the gaps and past the end
        fn = helpers.strided if layout == "strided" else helpers.padded
        x, src, index = fn(x), fn(src), fn(index)
    elif layout == "index_t":
        index = index_t(index)
    return x, index, src


def _triton_params():
    """fp32 on every case; the other dtypes on a few; layouts on a few."""
    params = []
    for c in TRITON_CASES:
        params.append(pytest.param(c, torch.float32, "contiguous", id=f"{cid(c)}-fp32-contiguous"))
    for name, dt in TRITON_DTYPES.items():
        if dt == torch.float32:
            continue
        for c in (TRITON_CASES[2], TRITON_CASES[4], TRITON_CASES[5]):
            params.append(pytest.param(c, dt, "contiguous", id=f"{cid(c)}-{name}-contiguous"))
    for layout in TRITON_LAYOUTS[1:]:
        for c in (TRITON_CASES[1], TRITON_CASES[4]):
            for name in ("fp32", "fp16"):
                params.append(pytest.param(c, TRITON_DTYPES[name], layout, id=f"{cid(c)}-{name}-{layout}"))
    return params


@helpers.needs_triton
@pytest.mark.parametrize("case,dtype,layout", _triton_params())
def test_triton_gather(case, dtype, layout):
    x, index, _ = _triton_inputs(case, dtype, layout)
    out = K.gather_tokens(x, index, backend="triton")
    assert out.device == x.device
    assert_exact(out, oracle.gather(x.cpu(), index.cpu()), f"triton gather {cid(case)} {dtype} {layout}")


@helpers.needs_triton
@pytest.mark.parametrize("case,dtype,layout", _triton_params())
def test_triton_scatter(case, dtype, layout):
    base, index, src = _triton_inputs(case, dtype, layout)
    before = base.clone()
    out = K.scatter_tokens(base, index, src, backend="triton")
    assert_exact(out, oracle.scatter(base.cpu(), index.cpu(), src.cpu()), f"triton scatter {cid(case)} {dtype} {layout}")
    assert torch.equal(base, before), "scatter_tokens modified base"


@helpers.needs_triton
@pytest.mark.parametrize("case,dtype,layout", _triton_params())
def test_triton_scatter_inplace(case, dtype, layout):
    base, index, src = _triton_inputs(case, dtype, layout)
    expected = oracle.scatter(base.cpu(), index.cpu(), src.cpu())
    outside = _storage_outside(base.cpu()).clone() if base.device.type == "cpu" else None
    out = K.scatter_tokens_(base, index, src, backend="triton")
    assert out is base
    assert_exact(base, expected, f"triton scatter_ {cid(case)} {dtype} {layout}")
    if outside is not None:
        after = _storage_outside(base)
        assert torch.equal(after.isnan(), outside.isnan()) and torch.equal(
            after.nan_to_num(0), outside.nan_to_num(0)
        ), "scatter_tokens_ wrote outside base's view"


@helpers.needs_triton
@pytest.mark.parametrize("layout", ["x_expanded", "index_expanded", "x_transposed"])
def test_triton_gather_other_strides(layout):
    B, L, n, D = 2, 5, 2, 61
    dev = helpers.triton_device()
    x = data((B, L, D), torch.float32, dev)
    index = oracle.random_index(B, L, n).to(dev)
    if layout == "x_expanded":
        x = expanded_rows(x)
    elif layout == "index_expanded":
        index = expanded_rows(index)
    else:
        x = transposed_bl(x)
    out = K.gather_tokens(x, index, backend="triton")
    assert_exact(out, oracle.gather(x.cpu(), index.cpu()), f"triton gather {layout}")


@helpers.needs_triton
def test_triton_gradients():
    """Autograd through the forced Triton kernels (backward may use any backend) equals the oracle's."""
    B, L, n, D = 2, 5, 2, 3
    dev = helpers.triton_device()
    x = data((B, L, D), torch.float64, dev).requires_grad_()
    base = data((B, L, D), torch.float64, dev).requires_grad_()
    src = data((B, n, D), torch.float64, dev).requires_grad_()
    index = oracle.random_index(B, L, n).to(dev)
    _gradcheck(lambda x: K.gather_tokens(x, index, backend="triton"), (x,))
    _gradcheck(lambda b, s: K.scatter_tokens(b, index, s, backend="triton"), (base, src))


@helpers.needs_triton
@pytest.mark.parametrize("name", ["gather_tokens", "scatter_tokens", "scatter_tokens_"])
def test_triton_opcheck(name):
    B, L, n, D = 2, 5, 2, 3
    dev = helpers.triton_device()
    x = data((B, L, D), torch.float32, dev)
    src = data((B, n, D), torch.float32, dev)
    index = oracle.random_index(B, L, n).to(dev)
    args = {
        "gather_tokens": (x.requires_grad_(), index, "triton"),
        "scatter_tokens": (x.requires_grad_(), index, src.requires_grad_(), "triton"),
        "scatter_tokens_": (x, index, src, "triton"),
    }[name]
    torch.library.opcheck(getattr(torch.ops.enat, name).default, args)


@helpers.needs_triton
def test_triton_forced_cannot_serve_lists_why():
    dev = helpers.triton_device()
    index = oracle.random_index(2, 5, 2).to(dev)
    xb = torch.ones(2, 5, 3, dtype=torch.bool, device=dev)
    with pytest.raises(BackendUnavailableError, match="bool"):
        K.gather_tokens(xb, index, backend="triton")


@helpers.needs_triton
@pytest.mark.parametrize("op", ["gather_tokens", "scatter_tokens", "scatter_tokens_"])
def test_triton_last_dim_strided(op):
    """A last dim with stride != 1 (a transposed or sliced view) is copied exactly by Triton."""
    B, L, n, D = 2, 5, 2, 61
    dev = helpers.triton_device()
    base = DATA_LAYOUTS["last_dim_strided"](data((B, L, D), torch.float32, dev))
    src = DATA_LAYOUTS["last_dim_strided"](data((B, n, D), torch.float32, dev))
    index = oracle.random_index(B, L, n).to(dev)
    assert base.stride(-1) == 2
    if op == "gather_tokens":
        out, expected = K.gather_tokens(base, index, backend="triton"), oracle.gather(base.cpu(), index.cpu())
    else:
        expected = oracle.scatter(base.cpu(), index.cpu(), src.cpu())
        out = getattr(K, op)(base, index, src, backend="triton")
    assert_exact(out, expected, f"triton {op} last_dim_strided")
    if op == "scatter_tokens_":
        assert out is base


@helpers.needs_triton
@pytest.mark.parametrize("op", ["gather_tokens", "scatter_tokens", "scatter_tokens_"])
@pytest.mark.parametrize("bad", [[[0, 5], [1, 2]], [[0, 1], [3, 3]], [[2, 1], [0, 4]], [[-1, 2], [0, 1]]],
                         ids=["out_of_range", "duplicate", "descending", "negative"])
def test_triton_bad_index_is_caught_before_the_kernel(op, bad, monkeypatch):
    """Bad index values raise ValueError with the Triton backend forced (CPU tensors are always
    checked; CUDA tensors in debug mode)."""
    dev = helpers.triton_device()
    if dev == "cuda":
        monkeypatch.setenv("ENAT_KERNELS_DEBUG", "1")
    x = data((2, 5, 3), torch.float32, dev)
    src = data((2, 2, 3), torch.float32, dev)
    index = torch.tensor(bad, device=dev)
    before = x.clone()
    with pytest.raises(ValueError, match="index"):
        if op == "gather_tokens":
            K.gather_tokens(x, index, backend="triton")
        else:
            getattr(K, op)(x, index, src, backend="triton")
    assert torch.equal(x, before)


@helpers.needs_gpu
def test_cuda_gather_matches_oracle():
    for case in [(1, 1, 0, 1), (3, 9, 9, 61), (3, 17, 5, 1024)]:
        B, L, n, D = case
        x = data((B, L, D), torch.float16, "cuda")
        index = oracle.random_index(B, L, n).cuda()
        out = K.gather_tokens(helpers.strided(x), index, backend="cuda")
        assert_exact(out, oracle.gather(x.cpu(), index.cpu()), f"cuda gather {cid(case)}")

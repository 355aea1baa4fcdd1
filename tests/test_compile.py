"""torch.compile(fullgraph=True) over every op on CPU (reference backend): the compiled results equal
eager ones (and the oracle), and gradients flow through compiled code. Counts are given, since
count=None reads the mask on the host (a graph break). Two compiles in all: each costs seconds.
"""

import torch

import enat_kernels.ops as K

import oracle

B, H, L, N, D, HD = 2, 2, 10, 4, 8, 16  # batch, heads, tokens, masked per row, token dim, head dim


def _inputs(requires_grad=False):
    g = torch.Generator().manual_seed(1)
    mask = oracle.random_mask(B, L, N, generator=g)
    fi, ci = [], []
    for _ in range(B):
        perm = torch.randperm(L, generator=g).tolist()
        fi.append(sorted(perm[:3]))
        ci.append(sorted(perm[3:8]))
    t = dict(
        q=torch.randn(B, H, 5, HD, generator=g),
        k_ctx=torch.randn(B, H, 6, HD, generator=g),
        v_ctx=torch.randn(B, H, 6, HD, generator=g),
        k_self=torch.randn(B, H, 3, HD, generator=g),
        v_self=torch.randn(B, H, 3, HD, generator=g),
        x=torch.randn(B, L, D, generator=g),
        src=torch.randn(B, N, D, generator=g),
        fresh=torch.randn(B, 3, D, generator=g),
        cached=torch.randn(B, 5, D, generator=g),
    )
    if requires_grad:
        for v in t.values():
            v.requires_grad_()
    t.update(mask=mask, fresh_index=torch.tensor(fi), cached_index=torch.tensor(ci))
    return t


def every_op(q, k_ctx, v_ctx, k_self, v_self, x, src, fresh, cached, mask, fresh_index, cached_index):
    attn, lse = K.asymmetric_attention(q, k_ctx, v_ctx, k_self, v_self, return_lse=True)
    index = K.mask_to_index(mask, N)
    gathered = K.gather_tokens(x, index)
    scattered = K.scatter_tokens(x, index, src)
    inplace = x.detach().clone()
    K.scatter_tokens_(inplace, index, src.detach() * 2)
    visible, masked = K.split_tokens(x, mask, N)
    restored = K.restore_tokens(visible * 3, masked, mask)
    merged = K.merge_cache(fresh, fresh_index, cached, cached_index)
    return dict(
        attn=attn, lse=lse, index=index, gathered=gathered, scattered=scattered, inplace=inplace,
        visible=visible, masked=masked, restored=restored, merged=merged,
    )


def test_compiled_every_op_matches_eager_and_oracle():
    torch._dynamo.reset()
    t = _inputs()
    with torch.no_grad():
        eager = every_op(**t)
        compiled = torch.compile(every_op, fullgraph=True, dynamic=False)(**t)
    assert set(compiled) == set(eager)
    for name in eager:
        assert compiled[name].shape == eager[name].shape, name
        assert compiled[name].dtype == eager[name].dtype, name
        if name in ("attn", "lse"):
            torch.testing.assert_close(compiled[name], eager[name], rtol=1e-6, atol=1e-6, msg=name)
        else:
            assert torch.equal(compiled[name], eager[name]), f"{name}: compiled != eager"

    # and both against the oracle
    ref_attn, ref_lse = oracle.attention(t["q"], t["k_ctx"], t["v_ctx"], t["k_self"], t["v_self"])
    torch.testing.assert_close(compiled["attn"].double(), ref_attn, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(compiled["lse"].double(), ref_lse, rtol=1e-5, atol=1e-5)
    index = oracle.mask_to_index(t["mask"])
    assert torch.equal(compiled["index"], index)
    assert torch.equal(compiled["gathered"], oracle.gather(t["x"], index))
    assert torch.equal(compiled["scattered"], oracle.scatter(t["x"], index, t["src"]))
    assert torch.equal(compiled["inplace"], oracle.scatter(t["x"], index, t["src"] * 2))
    v, m = oracle.split(t["x"], t["mask"])
    assert torch.equal(compiled["visible"], v) and torch.equal(compiled["masked"], m)
    assert torch.equal(compiled["restored"], oracle.restore(v * 3, m, t["mask"]))
    assert torch.equal(
        compiled["merged"], oracle.merge(t["fresh"], t["fresh_index"], t["cached"], t["cached_index"])
    )


def _loss(q, k_ctx, v_ctx, k_self, v_self, x, src, fresh, cached, mask, fresh_index, cached_index):
    """A scalar touching every differentiable op, with weights so each gradient is distinct."""
    attn = K.asymmetric_attention(q, k_ctx, v_ctx, k_self, v_self)
    index = K.mask_to_index(mask, N)
    gathered = K.gather_tokens(x, index)
    scattered = K.scatter_tokens(x * 0.5, index, src)
    visible, masked = K.split_tokens(x, mask, N)
    restored = K.restore_tokens(visible.sin(), masked * 2, mask)
    merged = K.merge_cache(fresh, fresh_index, cached, cached_index)
    w = torch.arange(1, D + 1, dtype=x.dtype)
    return (
        (attn * attn.detach().cos()).sum()
        + (gathered.pow(2) * w).sum()
        + (scattered * scattered.detach().exp()).sum()
        + (restored * w).sum()
        + (merged.pow(3)).sum()
    )


def test_compiled_backward_matches_eager():
    torch._dynamo.reset()
    t = _inputs(requires_grad=True)
    leaves = [k for k, v in t.items() if v.requires_grad]
    eager = torch.autograd.grad(_loss(**t), [t[k] for k in leaves])
    t2 = {k: (v.detach().clone().requires_grad_(v.requires_grad)) for k, v in t.items()}
    loss = torch.compile(_loss, fullgraph=True, dynamic=False)(**t2)
    compiled = torch.autograd.grad(loss, [t2[k] for k in leaves])
    for name, a, b in zip(leaves, eager, compiled):
        assert b is not None and b.shape == a.shape, name
        assert not torch.isnan(b).any(), name
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5, msg=f"d{name}: compiled != eager")
        assert a.abs().sum() > 0, f"d{name} is zero: the loss does not reach it"

    # The attention gradients also against the oracle's autograd.
    q64 = [t[k].detach().double().requires_grad_() for k in ("q", "k_ctx", "v_ctx", "k_self", "v_self")]
    ref_out, _ = oracle.attention(*q64)
    ref = torch.autograd.grad((ref_out * ref_out.detach().cos()).sum(), q64)
    for name, r in zip(("q", "k_ctx", "v_ctx", "k_self", "v_self"), ref):
        torch.testing.assert_close(compiled[leaves.index(name)].double(), r, rtol=1e-4, atol=1e-5, msg=f"d{name} vs oracle")

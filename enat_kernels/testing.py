"""Checking an op's result against a float64 reference: the error budget of the op contract
(docs/OPS.md, Tolerances) and the awkward layouts the model passes. The tests and
`python -m enat_kernels --check` both use these, so an installation is held to the tests' budgets.

The budget (the FlashAttention rule): a result's largest error against the float64 reference is at
most `factor` (2 for outputs, 3 for gradients) times the error of the same computation done by plain
PyTorch in the result's dtype, plus FLOOR_ULPS ulps of the dtype at the magnitude of the terms the
result sums (`attention_error_scales`, `adaln_error_scales`). Token movement is exact.

    error, budget = error_budget(out, ref64, torch_same_dtype, 2, scale=scales["out"])
    assert_within_budget(out, ref64, torch_same_dtype, 2, what="out", scale=scales["out"])
"""

import torch

# Rounding floor of the error budget, in ulps of the output dtype at the scale of the summed terms
# (attention_error_scales). A correct kernel rounds each term a handful of times (products, exp2, the
# fp32 accumulations), each worth half an ulp of that scale; how the roundings fall differs between
# CPUs, BLAS builds and GPUs, so the same-dtype PyTorch error alone can be a lucky 0.3 ulp while an
# equally correct kernel lands at several. A wrong kernel misses by a sizeable fraction of the scale,
# thousands of ulps.
FLOOR_ULPS = 4

INTERPRETED_BF16 = "the Triton interpreter computes bf16 wrongly (a known interpreter limit); bf16 runs on a GPU"


def max_error(a, b):
    """The largest |a - b|, in float64 (NaN if either holds NaN; 0 for empty tensors)."""
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def _floor(out, oracle, scale):
    """(scale, FLOOR_ULPS ulps of out's dtype at it); the scale defaults to the largest |oracle| entry."""
    if scale is None:
        scale = oracle.double().abs().max().item()
    return scale, FLOOR_ULPS * torch.finfo(out.dtype).eps * scale


def error_budget(out, oracle, torch_same_dtype, factor, scale=None):
    """(error, budget): the error of `out` against the float64 `oracle`, and what the rule allows:
    `factor` times the error of `torch_same_dtype` (plain PyTorch in out's dtype) plus FLOOR_ULPS ulps
    of out's dtype at `scale` (the magnitude of the terms the result sums; by default the largest
    |oracle| entry). Within budget when error <= budget (never with NaN)."""
    if out.numel() == 0:
        return 0.0, 0.0
    return max_error(out, oracle), factor * max_error(torch_same_dtype, oracle) + _floor(out, oracle, scale)[1]


def assert_within_budget(out, oracle, torch_same_dtype, factor, what="", scale=None):
    """error_budget(...) as an assertion whose message gives both errors and the floor."""
    err, budget = error_budget(out, oracle, torch_same_dtype, factor, scale)
    if not err <= budget:
        scale, floor = _floor(out, oracle, scale)
        raise AssertionError(f"{what}: error {err:.3e} > {factor} x {max_error(torch_same_dtype, oracle):.3e} (torch) "
                             f"+ {floor:.3e} ({FLOOR_ULPS} ulps at scale {scale:.3g})")


def _biggest(t):
    return t.abs().max().item() if t.numel() else 0.0


def attention_error_scales(q, k_ctx, v_ctx, k_self, v_self, grad_out=None, scale=None):
    """The magnitude of the terms each attention result is summed from, in float64: the scale that
    rounding errors are relative to, even where the terms cancel. With P = softmax(S), S = q k^T * scale:

        out ~ P |v|,  lse ~ max |scale| |q| |k|^T,  dv ~ P^T |dO|,
        dS ~ P (|dO| |v|^T + rowsum(|dO| |out|)),  dq ~ |scale| dS |k|,  dk ~ |scale| dS^T |q|.

    Returns {name: largest magnitude} for "out" and "lse", and with grad_out also "q", "k_ctx",
    "v_ctx", "k_self", "v_self" (their gradients)."""
    if scale is None:
        scale = q.shape[-1] ** -0.5
    q, k_ctx, v_ctx, k_self, v_self = (t.detach().double() for t in (q, k_ctx, v_ctx, k_self, v_self))
    k = torch.cat([k_ctx, k_self], dim=2)
    v = torch.cat([v_ctx, v_self], dim=2)
    p = torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1)
    out = p @ v
    scales = {"out": _biggest(p @ v.abs()), "lse": _biggest(abs(scale) * q.abs() @ k.abs().transpose(-1, -2))}
    if grad_out is not None:
        do = grad_out.detach().double().abs()
        ds = p * (do @ v.abs().transpose(-1, -2) + (do * out.abs()).sum(-1, keepdim=True))
        dk = abs(scale) * ds.transpose(-1, -2) @ q.abs()
        dv = p.transpose(-1, -2) @ do
        Lc = k_ctx.shape[2]
        scales.update(q=_biggest(abs(scale) * ds @ k.abs()), k_ctx=_biggest(dk[:, :, :Lc]),
                      v_ctx=_biggest(dv[:, :, :Lc]), k_self=_biggest(dk[:, :, Lc:]), v_self=_biggest(dv[:, :, Lc:]))
    return scales


def adaln_error_scales(x, shift, scale, grad_out=None, y=None, gate=None, grad_x_new=None, eps=1e-6):
    """The magnitude of the terms each adaLN result is summed from, in float64. With x_new = x + gate y
    (x itself without y), rstd = 1 / sqrt(var(x_new) + eps), xhat the normalised x_new, s = |1 + scale|:

        x_new ~ |x| + |gate| |y|,  out ~ (|x_new| + |mean|) rstd s + |shift|,
        dn ~ rstd (|g| s + mean_d(|g| s) + |xhat| mean_d(|g| s |xhat|)) + |grad_x_new|   (g = grad_out),
        dx ~ dn,  dy ~ |gate| dn,  dgate ~ sum_L dn |y|,  dshift ~ sum_L |g|,  dscale ~ sum_L |g| |xhat|.

    Returns {name: largest magnitude}: "out" (and "x_new" with y), and with grad_out the gradient of
    each input by its name."""
    x, shift, scale = (t.detach().double() for t in (x, shift, scale))
    s = (1 + scale[:, None, :]).abs()
    x_new = x
    if y is not None:
        y, gate = y.detach().double(), gate.detach().double()
        x_new = x + gate[:, None, :] * y
    mean = x_new.mean(-1, keepdim=True)
    rstd = 1 / torch.sqrt(((x_new - mean) ** 2).mean(-1, keepdim=True) + eps)
    xhat = ((x_new - mean) * rstd).abs()
    scales = {"out": _biggest((x_new.abs() + mean.abs()) * rstd * s + shift.abs()[:, None, :])}
    if y is not None:
        scales["x_new"] = _biggest(x.abs() + gate.abs()[:, None, :] * y.abs())
    if grad_out is not None:
        g = grad_out.detach().double().abs()
        gs = g * s
        dn = rstd * (gs + gs.mean(-1, keepdim=True) + xhat * (gs * xhat).mean(-1, keepdim=True))
        if grad_x_new is not None:
            dn = dn + grad_x_new.detach().double().abs()
        scales.update(x=_biggest(dn), shift=_biggest(g.sum(1)), scale=_biggest((g * xhat).sum(1)))
        if y is not None:
            scales.update(y=_biggest(gate.abs()[:, None, :] * dn), gate=_biggest((dn * y.abs()).sum(1)))
    return scales


# Layouts: copies of a tensor with the same values in the storage the model's views have, with NaN
# (or an out-of-range int) wherever a kernel must not read.


def _fill_value(dtype):
    if dtype.is_floating_point:
        return float("nan")
    if dtype == torch.bool:
        return True
    return torch.iinfo(dtype).max  # an out-of-range position if read as an index


def padded(t, extra=64):
    """A copy of t whose storage runs on past its logical end, filled with NaN (or an int sentinel),
    so that an out-of-bounds read shows up in the result."""
    flat = torch.full((t.numel() + extra,), _fill_value(t.dtype), dtype=t.dtype, device=t.device)
    out = flat[: t.numel()].view(t.shape)
    out.copy_(t)
    return out


def strided(t, pad=5):
    """A copy of t with the same values, its last dim still contiguous but every other stride padded
    (the gaps and the tail hold NaN), like a slice of a wider projection output."""
    full = torch.full((*t.shape[:-1], t.shape[-1] + pad), _fill_value(t.dtype), dtype=t.dtype, device=t.device)
    view = full[..., : t.shape[-1]]
    view.copy_(t)
    return view


def heads_view(t):
    """A copy of t (B, H, L, D) stored as (B, L, H, D) and permuted back: the layout of a projection
    output split into heads. Last dim contiguous, other dims not in order."""
    B, H, L, D = t.shape
    store = torch.full((B, L, H, D + 3), _fill_value(t.dtype), dtype=t.dtype, device=t.device)[..., :D]
    view = store.permute(0, 2, 1, 3)
    view.copy_(t)
    return view

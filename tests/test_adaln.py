"""enat_kernels.ops.adaln and residual_adaln against the fp64 oracle (tests/oracle.py), on the reference
backend, the C++ cpu kernels (and auto) on CPU tensors and on Triton (the GPU, or CPU tensors in its
interpreter).

Error rule (docs/OPS.md, Tolerances): the error against the fp64 oracle is at most 2x (forward) or 3x
(gradients) the error of the unfused PyTorch computation in the same dtype (F.layer_norm, modulate,
x + gate * y), plus a floor of 4 ulps at the scale of the terms summed (oracle.adaln_error_scales).
Shapes are small: the interpreter runs every Triton program on the CPU.
"""

import math
import sys

import pytest
import torch

import enat_kernels.ops as K
from enat_kernels.backends import BackendUnavailableError

import helpers
import oracle

A = sys.modules["enat_kernels.ops.adaln"]

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
FP32 = {"fp32": torch.float32}
FORWARD = list(A.ADALN.impls)  # the backends with forward kernels (both ops have the same ones)
BACKWARD = list(A.ADALN_BACKWARD.impls)
assert FORWARD == list(A.RESIDUAL_ADALN.impls) and BACKWARD == list(A.RESIDUAL_ADALN_BACKWARD.impls)
ROWS = ("gate", "shift", "scale")


def backend_params(backends, dtypes=DTYPES):
    """pytest params of (backend, dtype), marked to skip where the platform cannot run them."""
    return helpers.backend_params(backends, dtypes)


def backends_fp32(names):
    """pytest params of the backends `names` in fp32: the backend alone."""
    return [pytest.param(p.values[0], marks=p.marks, id=p.values[0]) for p in helpers.backend_params(names, FP32)]


def make_inputs(B, L, d, dtype=torch.float32, device="cpu", requires_grad=False):
    """{x, y, gate, shift, scale}: x, y (B, L, d) with a nonzero mean per row; rows (B, d)."""
    t = dict(
        x=torch.randn(B, L, d, dtype=torch.float64) + 0.5,
        y=torch.randn(B, L, d, dtype=torch.float64),
        gate=torch.randn(B, d, dtype=torch.float64),
        shift=torch.randn(B, d, dtype=torch.float64),
        scale=0.5 * torch.randn(B, d, dtype=torch.float64),
    )
    return {k: v.to(dtype=dtype, device=device).requires_grad_(requires_grad) for k, v in t.items()}


def case_id(c):
    return "B{}-L{}-d{}".format(*c)


# L = 1, B = 1, d = 61 and 366 (not powers of two), L not a multiple of the rows per program.
SHAPES = [(1, 1, 16), (2, 13, 61), (3, 7, 366), (1, 5, 64), (2, 1, 128)]
GRAD_SHAPES = [(2, 13, 61), (1, 1, 366), (3, 6, 64)]


def _call(op, t, backend=None, **kwargs):
    if op == "adaln":
        return K.adaln(t["x"], t["shift"], t["scale"], backend=backend, **kwargs)
    return K.residual_adaln(t["x"], t["y"], t["gate"], t["shift"], t["scale"], backend=backend, **kwargs)


def _oracle(op, t):
    """The fp64 oracle's outputs, as a tuple."""
    if op == "adaln":
        return (oracle.adaln(t["x"], t["shift"], t["scale"]),)
    return oracle.residual_adaln(t["x"], t["y"], t["gate"], t["shift"], t["scale"])


def _same_dtype(op, t):
    if op == "adaln":
        return (oracle.adaln_same_dtype(t["x"], t["shift"], t["scale"]),)
    return oracle.residual_adaln_same_dtype(t["x"], t["y"], t["gate"], t["shift"], t["scale"])


def _scales(op, t, **grads):
    if op == "adaln":
        return oracle.adaln_error_scales(t["x"], t["shift"], t["scale"], **grads)
    return oracle.adaln_error_scales(t["x"], t["shift"], t["scale"], y=t["y"], gate=t["gate"], **grads)


def _inputs_of(op):
    return ("x", "shift", "scale") if op == "adaln" else ("x", "y", "gate", "shift", "scale")


OPS = ("adaln", "residual_adaln")


def check_forward(op, outputs, t, what=""):
    """Each output against the oracle with the forward budget (factor 2)."""
    outputs = (outputs,) if op == "adaln" else outputs
    x = t["x"]
    detached = {k: v.detach() for k, v in t.items()}
    scales = _scales(op, detached)
    names = ("out",) if op == "adaln" else ("x_new", "out")
    for name, o, r, n in zip(names, outputs, _oracle(op, detached), _same_dtype(op, detached)):
        assert (o.shape, o.dtype, o.device) == (x.shape, x.dtype, x.device), f"{what} {name}: {o.dtype}{list(o.shape)}"
        assert o.is_contiguous(), f"{what} {name} is not contiguous"
        assert not torch.isnan(o).any(), f"{what}: NaN in {name}"
        helpers.assert_within_budget(o, r, n, 2, what=f"{what} {name}", scale=scales[name])


# Forward.


@pytest.mark.parametrize(("backend", "dtype"), backend_params([None, *FORWARD]))
@pytest.mark.parametrize("shape", SHAPES, ids=case_id)
@pytest.mark.parametrize("op", OPS)
def test_forward_matches_oracle(op, shape, dtype, backend):
    t = make_inputs(*shape, dtype=dtype, device=helpers.backend_device(backend))
    check_forward(op, _call(op, t, backend), t, what=f"{op} {case_id(shape)} {dtype} {backend}")


@pytest.mark.parametrize("op", OPS)
def test_forward_fp64(op):
    """fp64 inputs (reference backend): fp64 outputs, equal to the oracle to rounding."""
    t = make_inputs(2, 13, 61, dtype=torch.float64)
    outputs = _call(op, t, "reference")
    outputs = (outputs,) if op == "adaln" else outputs
    for o, r in zip(outputs, _oracle(op, t)):
        assert o.dtype == torch.float64
        torch.testing.assert_close(o, r, rtol=1e-12, atol=1e-12)


def test_eps_argument():
    t = make_inputs(2, 5, 16, dtype=torch.float64)
    x = t["x"] * 1e-3  # variance 1e-6: eps matters
    out = K.adaln(x, t["shift"], t["scale"], eps=1e-4)
    torch.testing.assert_close(out, oracle.adaln(x, t["shift"], t["scale"], eps=1e-4), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(out, K.adaln(x, t["shift"], t["scale"]))


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning", "ignore:invalid value:RuntimeWarning")
@pytest.mark.parametrize("backend", backends_fp32(FORWARD))
def test_eps_zero(backend):
    """eps = 0 is allowed: rows past L in a tile (rstd infinite there) do not reach the results."""
    t = make_inputs(2, 3, 61, device=helpers.backend_device(backend), requires_grad=True)
    out = K.adaln(t["x"], t["shift"], t["scale"], eps=0.0, backend=backend)
    x_new, out2 = K.residual_adaln(t["x"], t["y"], t["gate"], t["shift"], t["scale"], eps=0.0, backend=backend)
    grads = torch.autograd.grad((out, x_new, out2), list(t.values()), [torch.ones_like(out)] * 3)
    for o in (out, x_new, out2, *grads):
        assert torch.isfinite(o).all()


# Layouts: strided and permuted x, NaN past the logical end, and the model's views of one (B, 8d)
# modulation tensor (enat/model.py, Block).


def _modulation_views(t):
    """gate, shift, scale as column blocks of one (B, 8d) tensor, as Block's chunk(8) gives them."""
    B, d = t["shift"].shape
    mod = torch.full((B, 8 * d), float("nan"), dtype=t["shift"].dtype, device=t["shift"].device)
    views = {}
    for i, name in enumerate(ROWS):
        views[name] = mod[:, (2 * i + 1) * d:(2 * i + 2) * d]
        views[name].copy_(t[name])
    return views


LAYOUTS = {
    "strided": lambda t: {**t, "x": helpers.strided(t["x"]), "y": helpers.strided(t["y"])},
    "padded": lambda t: {k: helpers.padded(v) for k, v in t.items()},
    "permuted": lambda t: {**t, "x": t["x"].transpose(0, 1).contiguous().transpose(0, 1),
                           "y": helpers.heads_view(t["y"][:, None])[:, 0]},
    "model_views": lambda t: {**t, **_modulation_views(t)},
    "mixed": lambda t: {**_modulation_views(t), "x": helpers.strided(t["x"]), "y": helpers.padded(t["y"])},
}


@pytest.mark.parametrize(("backend", "dtype"), backend_params(FORWARD, {"fp32": torch.float32,
                                                                                      "fp16": torch.float16}))
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("op", OPS)
def test_layouts(op, layout, dtype, backend):
    t = make_inputs(3, 7, 61, dtype=dtype, device=helpers.backend_device(backend))
    views = LAYOUTS[layout](t)
    for k, v in views.items():
        assert torch.equal(v, t[k]) and v.stride(-1) == 1
    if layout in ("strided", "model_views", "mixed"):
        assert not all(v.is_contiguous() for v in views.values())
    outputs = _call(op, views, backend)
    check_forward(op, outputs, t, what=f"{op} {layout} {dtype} {backend}")
    if backend == "triton":  # strides change addresses only: the same bits as contiguous inputs
        for a, b in zip(outputs, _call(op, t, backend)):
            assert torch.equal(a, b)


@pytest.mark.parametrize("backend", backends_fp32(FORWARD))
def test_gradients_through_model_views(backend):
    """Gradients reach the (B, 8d) modulation tensor through its column views, as in the model."""
    B, L, d = 2, 5, 61
    device = helpers.backend_device(backend)
    t = make_inputs(B, L, d, device=device)
    mod = torch.randn(B, 8 * d, device=device, requires_grad=True)
    gate, shift, scale = (mod[:, i * d:(i + 1) * d] for i in (4, 5, 6))
    x = helpers.strided(t["x"]).requires_grad_()
    x_new, out = K.residual_adaln(x, t["y"], gate, shift, scale, backend=backend)
    dx, dmod = torch.autograd.grad((out * out.detach().cos()).sum() + x_new.sum(), (x, mod))
    leaves = [t["x"].clone().requires_grad_(), mod.detach().clone().requires_grad_()]
    rows = [leaves[1][:, i * d:(i + 1) * d].contiguous() for i in (4, 5, 6)]
    x_new2, out2 = K.residual_adaln(leaves[0], t["y"], *rows, backend=backend)
    ref = torch.autograd.grad((out2 * out2.detach().cos()).sum() + x_new2.sum(), leaves)
    torch.testing.assert_close(dx, ref[0])
    torch.testing.assert_close(dmod, ref[1])
    assert (dmod[:, :4 * d] == 0).all() and (dmod[:, 7 * d:] == 0).all()
    assert (dmod[:, 4 * d:7 * d] != 0).any()


# Gradients.


@pytest.mark.parametrize(("backend", "dtype"), backend_params(FORWARD))
@pytest.mark.parametrize("shape", GRAD_SHAPES, ids=case_id)
@pytest.mark.parametrize("op", OPS)
def test_gradients_match_oracle(op, shape, dtype, backend):
    """Gradients of every input against the oracle's autograd gradients (budget factor 3)."""
    device = helpers.backend_device(backend)
    t = make_inputs(*shape, dtype=dtype, device=device, requires_grad=True)
    names = _inputs_of(op)
    n_out = 1 if op == "adaln" else 2
    grads_out = [torch.randn(shape, dtype=torch.float64).to(dtype=dtype, device=device) for _ in range(n_out)]

    def outputs(fn, tensors):
        o = fn(tensors)
        return (o,) if op == "adaln" else o

    ours = torch.autograd.grad(outputs(lambda u: _call(op, u, backend), t), [t[n] for n in names], grads_out)
    leaves64 = {k: v.detach().double().requires_grad_() for k, v in t.items()}
    ref = torch.autograd.grad(_oracle(op, leaves64), [leaves64[n] for n in names], [g.double() for g in grads_out])
    leaves = {k: v.detach().clone().requires_grad_() for k, v in t.items()}
    naive = torch.autograd.grad(_same_dtype(op, leaves), [leaves[n] for n in names], grads_out)
    if op == "adaln":
        scales = _scales(op, t, grad_out=grads_out[0])
    else:
        scales = _scales(op, t, grad_out=grads_out[1], grad_x_new=grads_out[0])
    for name, g, r, n in zip(names, ours, ref, naive):
        assert g.shape == t[name].shape and g.dtype == dtype, f"d{name}: {g.dtype}{list(g.shape)}"
        assert not torch.isnan(g).any(), f"d{name}: NaN"
        helpers.assert_within_budget(g, r, n, 3, what=f"{op} d{name} {case_id(shape)} {dtype} {backend}",
                                     scale=scales[name])


@pytest.mark.parametrize("backend", backends_fp32(FORWARD))
@pytest.mark.parametrize("used", ["x_new", "out"])
def test_residual_one_output_used(used, backend):
    """A loss of only one of the two outputs: the other's gradient is taken as zero."""
    t = make_inputs(2, 5, 16, device=helpers.backend_device(backend), requires_grad=True)
    x_new, out = _call("residual_adaln", t, backend)
    loss = (x_new if used == "x_new" else out).pow(2).sum()
    grads = torch.autograd.grad(loss, list(t.values()))
    leaves = {k: v.detach().double().requires_grad_() for k, v in t.items()}
    x_new64, out64 = _oracle("residual_adaln", leaves)
    ref = torch.autograd.grad((x_new64 if used == "x_new" else out64).pow(2).sum(), list(leaves.values()),
                              allow_unused=True)
    for name, g, r in zip(t, grads, ref):
        r = torch.zeros_like(g, dtype=torch.float64) if r is None else r
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-4, msg=f"d{name}")


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("shape", [(2, 13, 61), (1, 1, 5)], ids=case_id)
def test_gradcheck_fp64(op, shape):
    t = make_inputs(*shape, dtype=torch.float64, requires_grad=True)
    names = _inputs_of(op)

    def f(*args):
        return _call(op, dict(zip(names, args)), "reference")

    assert torch.autograd.gradcheck(f, [t[n] for n in names], eps=1e-6, atol=1e-8, rtol=1e-6)


# Triton tiling: rows per program and programs per batch row forced, so that row tiles straddle L,
# programs walk several tiles and some programs have none (their partial sums are zeros).


@helpers.needs_triton
@pytest.mark.parametrize(("block_l", "programs"), [(1, 1), (2, 3), (4, 2), (8, 5)], ids=lambda v: str(v))
def test_triton_tiling(block_l, programs):
    device = helpers.triton_device()
    t = {k: v.detach() for k, v in make_inputs(3, 13, 61, device=device).items()}
    g_new, g_out = torch.randn(2, 3, 13, 61, device=device)
    ref_new, ref_out = A.residual_adaln_reference(*(t[n] for n in _inputs_of("residual_adaln")), 1e-6)
    x_new, out = A._forward_triton(t["x"], t["y"], t["gate"], t["shift"], t["scale"], 1e-6, block_l=block_l)
    torch.testing.assert_close(x_new, ref_new, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    ref = A.residual_adaln_backward_reference(g_new, g_out, ref_new, t["y"], t["gate"], t["scale"], 1e-6)
    ours = A._backward_triton(g_new, g_out, x_new, t["y"], t["gate"], t["scale"], 1e-6, block_l=block_l,
                              programs=programs)
    for name, a, b in zip(("x", "y", "gate", "shift", "scale"), ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"d{name}")
    again = A._backward_triton(g_new, g_out, x_new, t["y"], t["gate"], t["scale"], 1e-6, block_l=block_l,
                               programs=programs)
    assert all(torch.equal(a, b) for a, b in zip(ours, again)), "the backward is not deterministic"


@pytest.mark.parametrize("backend", backends_fp32(FORWARD))
def test_empty(backend):
    """L = 0: empty outputs, zero gradients for the (B, d) rows."""
    t = make_inputs(2, 0, 16, device=helpers.backend_device(backend), requires_grad=True)
    x_new, out = _call("residual_adaln", t, backend)
    assert x_new.shape == out.shape == (2, 0, 16)
    grads = torch.autograd.grad((x_new.sum() + out.sum()), list(t.values()))
    assert [tuple(g.shape) for g in grads] == [(2, 0, 16), (2, 0, 16), (2, 16), (2, 16), (2, 16)]
    assert all((g == 0).all() for g in grads)


# Dispatch.


@pytest.mark.parametrize(("dtype", "expected"), [(torch.float32, "cpu"), (torch.float64, "cpu"), (torch.float16, "reference")])
def test_auto_on_cpu_tensors(dtype, expected):
    """The C++ kernels where they are built and take the dtype, else the reference."""
    t = make_inputs(1, 2, 16, dtype=dtype)
    if helpers._library.CPU is None:
        expected = "reference"
    assert A.ADALN.select(None, t["x"].device, t["x"], t["shift"], t["scale"], 1e-6) == expected


@helpers.needs_triton
def test_env_backend_switch(monkeypatch):
    t = make_inputs(1, 3, 16, device=helpers.triton_device())
    monkeypatch.setenv("ENAT_KERNELS_BACKEND", "triton")
    x = t["x"]
    assert A.RESIDUAL_ADALN.select(None, x.device, x, t["y"], t["gate"], t["shift"], t["scale"], 1e-6) == "triton"
    check_forward("residual_adaln", _call("residual_adaln", t), t, what="env triton")
    monkeypatch.setenv("ENAT_KERNELS_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="ENAT_KERNELS_BACKEND"):
        _call("adaln", t)


def test_forced_backend_that_cannot_serve_lists_why():
    t = make_inputs(1, 2, 16)
    with pytest.raises(BackendUnavailableError, match="no cuda kernel for adaln"):
        _call("adaln", t, "cuda")


@helpers.needs_cpu_kernels
@pytest.mark.parametrize(("change", "pattern"), [
    (lambda t: {k: v.half() for k, v in t.items()}, "take float32, float64, got float16"),
    (lambda t: {**t, "y": t["y"].transpose(1, 2).contiguous().transpose(1, 2)}, "y is not contiguous"),
    (lambda t: {**t, "scale": t["scale"].t().contiguous().t()}, "scale is not contiguous"),
], ids=["fp16", "y_last_dim", "scale_last_dim"])
def test_forced_cpu_limits(change, pattern):
    t = change(make_inputs(2, 3, 16))
    with pytest.raises(BackendUnavailableError, match=pattern):
        _call("residual_adaln", t, "cpu")
    check_forward("residual_adaln", _call("residual_adaln", t), t, what="auto on what the cpu kernel refuses")


@helpers.needs_triton
@pytest.mark.parametrize(("change", "pattern"), [
    (lambda t: make_inputs(1, 2, A.TRITON_MAX_D + 1, device=helpers.triton_device()), r"d = 8193 is above"),
    (lambda t: {k: v.double() for k, v in t.items()}, "take float16, bfloat16, float32, got float64"),
    (lambda t: {**t, "x": t["x"].transpose(1, 2).contiguous().transpose(1, 2)}, "x is not contiguous"),
    (lambda t: {**t, "gate": t["gate"].t().contiguous().t()}, "gate is not contiguous"),
], ids=["d_too_large", "fp64", "x_last_dim", "gate_last_dim"])
def test_forced_triton_limits(change, pattern):
    t = change(make_inputs(2, 3, 16, device=helpers.triton_device()))
    with pytest.raises(BackendUnavailableError, match=pattern):
        _call("residual_adaln", t, "triton")
    if "gate" not in pattern:
        with pytest.raises(BackendUnavailableError, match=pattern):
            _call("adaln", t, "triton")


# opcheck (torch.library): schema, fake kernel, autograd registration, AOT dispatch.



@pytest.mark.parametrize(("backend", "dtype"), backend_params(FORWARD, FP32))
@pytest.mark.parametrize("op", OPS)
def test_opcheck_forward(op, backend, dtype):
    t = make_inputs(2, 5, 61, dtype=dtype, device=helpers.backend_device(backend), requires_grad=True)
    args = [t[n] for n in _inputs_of(op)]
    torch.library.opcheck(getattr(torch.ops.enat, op).default, (*args, 1e-6, backend))


@pytest.mark.parametrize(("backend", "dtype"), backend_params(BACKWARD, FP32))
@pytest.mark.parametrize("op", OPS)
def test_opcheck_backward(op, backend, dtype):
    t = make_inputs(2, 5, 61, dtype=dtype, device=helpers.backend_device(backend))
    g = torch.randn_like(t["x"])
    if op == "adaln":
        args = (g, t["x"], t["scale"])
    else:
        x_new, _ = torch.ops.enat.residual_adaln(*(t[n] for n in _inputs_of(op)), 1e-6, backend)
        args = (torch.randn_like(g), g, x_new, t["y"], t["gate"], t["scale"])
    torch.library.opcheck(getattr(torch.ops.enat, f"{op}_backward").default, (*args, 1e-6, backend))


# torch.compile(fullgraph=True), reference backend on CPU.


def _both(x, y, gate, shift, scale):
    out = K.adaln(x, shift, scale)
    x_new, out2 = K.residual_adaln(x, y, gate, shift, scale)
    return out, x_new, out2


def test_compiled_matches_eager_and_oracle():
    torch._dynamo.reset()
    t = make_inputs(2, 7, 61)
    eager = _both(**t)
    compiled = torch.compile(_both, fullgraph=True, dynamic=False)(**t)
    for a, b in zip(compiled, eager):
        assert a.shape == b.shape and a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    ref = (oracle.adaln(t["x"], t["shift"], t["scale"]), *_oracle("residual_adaln", t))
    for a, r in zip(compiled, ref):
        torch.testing.assert_close(a.double(), r, rtol=1e-5, atol=1e-5)


def test_compiled_backward_matches_eager():
    torch._dynamo.reset()

    def loss(x, y, gate, shift, scale):
        out, x_new, out2 = _both(x, y, gate, shift, scale)
        return (out * out.detach().sin()).sum() + (x_new * x_new.detach().cos()).sum() + (out2.pow(2)).sum()

    t = make_inputs(2, 7, 61, requires_grad=True)
    eager = torch.autograd.grad(loss(**t), list(t.values()))
    t2 = {k: v.detach().clone().requires_grad_() for k, v in t.items()}
    compiled = torch.autograd.grad(torch.compile(loss, fullgraph=True, dynamic=False)(**t2), list(t2.values()))
    for name, a, b in zip(t, eager, compiled):
        assert b is not None and b.shape == a.shape, name
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5, msg=f"d{name}: compiled != eager")
        assert a.abs().sum() > 0, f"d{name} is zero"


# Bad input.


def _bad(**changes):
    """Valid fp32 inputs (B=2, L=3, d=16) with some replaced."""
    return helpers.replaced(make_inputs(2, 3, 16), changes)


BAD_INPUTS = {
    # name: (changes, exception, message pattern); each runs on both ops unless marked residual-only
    "x_rank2": (dict(x=lambda t: t[0]), ValueError, r"x must have 3 dimensions.*\[3, 16\]"),
    "x_rank4": (dict(x=lambda t: t[None]), ValueError, r"x must have 3 dimensions"),
    "shift_rank3": (dict(shift=lambda t: t[:, None]), ValueError, r"shift must have 2 dimensions.*\[2, 1, 16\]"),
    "scale_rank1": (dict(scale=lambda t: t[0]), ValueError, r"scale must have 2 dimensions"),
    "shift_d": (dict(shift=lambda t: t[:, :8]), ValueError, r"shift.shape\[1\] must equal x.shape\[2\]"),
    "scale_d": (dict(scale=lambda t: torch.cat([t, t], 1)), ValueError, r"scale.shape\[1\] must equal x.shape\[2\]"),
    "scale_batch": (dict(scale=lambda t: t[:1]), ValueError, r"scale.shape\[0\] must equal x.shape\[0\]"),
    "shift_batch": (dict(shift=lambda t: torch.cat([t, t])), ValueError, r"shift.shape\[0\] must equal x.shape\[0\]"),
    "mixed_dtype": (dict(scale=lambda t: t.half()), TypeError, r"scale.*float16"),
    "mixed_dtype_x": (dict(x=lambda t: t.double()), TypeError, r"x and \w+ must have the same dtype"),
    "int_dtype": (dict(x=lambda t: t.long(), y=lambda t: t.long(), gate=lambda t: t.long(),
                       shift=lambda t: t.long(), scale=lambda t: t.long()), TypeError, r"x must be one of.*int64"),
    "non_tensor_x": (dict(x=lambda t: t.tolist()), TypeError, "x must be a torch.Tensor"),
    "non_tensor_scale": (dict(scale=None), TypeError, "scale must be a torch.Tensor"),
    "mixed_device": (dict(shift=lambda t: t.to("meta")), ValueError, "x and shift must have the same device"),
    "eps_str": (dict(eps="1e-6"), TypeError, "eps"),
    "eps_bool": (dict(eps=True), TypeError, "eps"),
    "eps_negative": (dict(eps=-1e-6), ValueError, "eps"),
    "eps_nan": (dict(eps=math.nan), ValueError, "eps"),
    "backend_unknown": (dict(backend="cudnn"), ValueError, "backend"),
    "backend_cuda": (dict(backend="cuda"), BackendUnavailableError, "cuda"),
}
RESIDUAL_BAD_INPUTS = {
    "y_shape": (dict(y=lambda t: t[:, :2]), ValueError, r"y.shape\[1\] must equal x.shape\[1\]"),
    "y_d": (dict(y=lambda t: t[..., :8]), ValueError, r"y.shape\[2\] must equal x.shape\[2\]"),
    "y_batch": (dict(y=lambda t: t[:1]), ValueError, r"y.shape\[0\] must equal x.shape\[0\]"),
    "y_rank": (dict(y=lambda t: t[0]), ValueError, r"y must have 3 dimensions"),
    "gate_rank": (dict(gate=lambda t: t[:, None]), ValueError, r"gate must have 2 dimensions"),
    "gate_d": (dict(gate=lambda t: t[:, 1:]), ValueError, r"gate.shape\[1\] must equal x.shape\[2\]"),
    "gate_dtype": (dict(gate=lambda t: t.bfloat16()), TypeError, r"gate.*bfloat16"),
    "y_dtype": (dict(y=lambda t: t.half()), TypeError, r"y.*float16"),
    "non_tensor_gate": (dict(gate=1.0), TypeError, "gate must be a torch.Tensor"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS) + list(RESIDUAL_BAD_INPUTS))
def test_bad_input(name):
    changes, exc, pattern = {**BAD_INPUTS, **RESIDUAL_BAD_INPUTS}[name]
    t, kwargs = _bad(**changes)
    with pytest.raises(exc, match=pattern):
        K.residual_adaln(**t, **kwargs)
    if name in BAD_INPUTS:
        with pytest.raises(exc, match=pattern):
            K.adaln(t["x"], t["shift"], t["scale"], **kwargs)


@helpers.needs_gpu
def test_cuda_graph_capture_and_no_host_sync():
    """Both ops, forward and backward, inside a CUDA graph with host syncs forbidden; the replay gives
    the eager results."""
    g = torch.Generator("cuda").manual_seed(0)
    x, y = (torch.randn(4, 37, 96, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(2))
    gate, shift, scale = (torch.randn(4, 96, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(3))
    leaves = [t.requires_grad_() for t in (x, y, gate, shift, scale)]

    def step():
        x_new, out = K.residual_adaln(*leaves)
        return (x_new, out, *torch.autograd.grad((K.adaln(out, shift, scale).float().sum() + x_new.float().sum()),
                                                 leaves))

    expected = step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.cuda.graph(graph):
            captured = step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(captured, expected):
        assert torch.equal(a, b)

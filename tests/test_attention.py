"""enat_kernels.ops.asymmetric_attention against the fp64 oracle (tests/oracle.py), on every backend
that can run on this machine.

Forward and gradients follow the FlashAttention rule (docs/OPS.md, Tolerances): the error against the
fp64 oracle is at most 2x (forward) or 3x (gradients) the error of the naive same-dtype PyTorch
computation (cat + matmul + softmax in the input dtype), plus a floor of 4 ulps at the scale of the
terms summed (enat_kernels.testing.FLOOR_ULPS). The reference, the C++ cpu kernels (and auto) run on
CPU tensors; Triton on the GPU, or on CPU tensors in its interpreter when there is no GPU; CUDA on the
GPU only.
"""

import math
import sys

import pytest
import torch

import enat_kernels
import enat_kernels.ops as K
from enat_kernels.backends import BackendUnavailableError

import helpers
import oracle

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
NAMES = ("q", "k_ctx", "v_ctx", "k_self", "v_self")

ATTENTION = sys.modules["enat_kernels.ops.asymmetric_attention"]
FORWARD = list(ATTENTION.FORWARD.impls)  # the backends with a forward kernel; backward ones: BACKWARD
BACKWARD = list(ATTENTION.BACKWARD.impls)


@pytest.fixture(autouse=True)
def _refused_fp32_head_dims(request):
    """On a GPU the Triton backend refuses fp32 above head dim TRITON_FP32_MAX_D (tested in
    test_gpu_targets.py); the interpreter runs those cases on CPU tensors."""
    params = request.node.callspec.params if hasattr(request.node, "callspec") else {}
    shape = params.get("shape")
    if (params.get("backend") == "triton" and helpers.backend_device("triton") == "cuda" and params.get("dtype") == torch.float32
            and shape is not None and shape[-1] > ATTENTION.TRITON_FP32_MAX_D):
        pytest.skip("the Triton backend refuses fp32 GPU tensors above head dim 32 (exact products spill registers)")


def backend_params(backends, dtypes=DTYPES):
    """pytest params of (backend, dtype), marked to skip where the platform cannot run them."""
    return helpers.backend_params(backends, dtypes)


def make_inputs(B, H, Lq, Lc, Ls, D, dtype=torch.float32, device="cpu", requires_grad=False):
    shapes = ((B, H, Lq, D), (B, H, Lc, D), (B, H, Lc, D), (B, H, Ls, D), (B, H, Ls, D))
    return [
        torch.randn(s, dtype=torch.float64).to(dtype=dtype, device=device).requires_grad_(requires_grad)
        for s in shapes
    ]


def case_id(c):
    B, H, Lq, Lc, Ls, D = c
    return f"B{B}H{H}-Lq{Lq}-Lc{Lc}-Ls{Ls}-D{D}"


# A representative slice of B, H in 1..3; Lq in {0, 1, 7, 13}; (Lc, Ls) in {(0,5), (5,0), (1,1), (17,4)};
# D in {16, 61, 64, 128}: every value of every axis appears at least once.
SHAPES = [
    (1, 1, 1, 1, 1, 16),
    (2, 3, 7, 17, 4, 61),
    (3, 2, 13, 0, 5, 64),
    (1, 3, 13, 5, 0, 128),
    (2, 1, 0, 17, 4, 64),
    (3, 1, 7, 0, 5, 16),
    (1, 2, 1, 5, 0, 61),
    (2, 2, 13, 1, 1, 128),
    (1, 1, 7, 17, 4, 16),
]


def check_forward(out, lse, inputs, scale=None, what=""):
    """out and lse against the oracle, with the FlashAttention forward budget (factor 2)."""
    q = inputs[0]
    B, H, Lq, D = q.shape
    ref_out, ref_lse = oracle.attention(*inputs, scale=scale)
    assert out.shape == (B, H, Lq, D), f"{what}: out shape {tuple(out.shape)}"
    assert out.dtype == q.dtype
    assert out.device == q.device
    assert not torch.isnan(out).any(), f"{what}: NaN in out"
    naive = oracle.attention_same_dtype(*(t.detach() for t in inputs), scale=scale)
    scales = oracle.attention_error_scales(*inputs, scale=scale)
    helpers.assert_within_budget(out, ref_out, naive, 2, what=f"{what} out", scale=scales["out"])
    if lse is not None:
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        assert lse.shape == (B, H, Lq), f"{what}: lse shape {tuple(lse.shape)}"
        assert lse.dtype == acc, f"{what}: lse dtype {lse.dtype}, expected {acc}"
        assert not torch.isnan(lse).any(), f"{what}: NaN in lse"
        # Same-dtype PyTorch lse: logsumexp of the concatenated scores in the input dtype.
        s = scale if scale is not None else D**-0.5
        k = torch.cat([inputs[1], inputs[3]], dim=2).detach()
        naive_lse = torch.logsumexp((q.detach() @ k.transpose(-1, -2)) * s, dim=-1)
        helpers.assert_within_budget(lse, ref_lse, naive_lse, 2, what=f"{what} lse", scale=scales["lse"])


# Forward.


@pytest.mark.parametrize(("backend", "dtype"), backend_params([None, *FORWARD]))
@pytest.mark.parametrize("shape", SHAPES, ids=[case_id(c) for c in SHAPES])
def test_forward_matches_oracle(shape, dtype, backend):
    inputs = make_inputs(*shape, dtype=dtype, device=helpers.backend_device(backend))
    out, lse = K.asymmetric_attention(*inputs, return_lse=True, backend=backend)
    check_forward(out, lse, inputs, what=f"{case_id(shape)} {dtype} {backend}")


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=helpers.needs_cpu_kernels)])
@pytest.mark.parametrize("shape", SHAPES[:4], ids=[case_id(c) for c in SHAPES[:4]])
def test_forward_fp64(shape, backend):
    """fp64 inputs (reference and cpu backends): out and lse in fp64, equal to the oracle to rounding."""
    inputs = make_inputs(*shape, dtype=torch.float64)
    out, lse = K.asymmetric_attention(*inputs, return_lse=True, backend=backend)
    ref_out, ref_lse = oracle.attention(*inputs)
    assert out.dtype == torch.float64 and lse.dtype == torch.float64
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_return_lse_default_is_tensor_only(dtype):
    inputs = make_inputs(2, 2, 7, 5, 3, 64, dtype=dtype)
    out = K.asymmetric_attention(*inputs)
    assert isinstance(out, torch.Tensor)
    out2, lse = K.asymmetric_attention(*inputs, return_lse=True)
    assert torch.equal(out, out2)
    assert lse.dtype == torch.float32


@pytest.mark.parametrize(("backend", "dtype"), backend_params([None, *FORWARD], {"fp32": torch.float32}))
@pytest.mark.parametrize("shape", [(2, 3, 7, 5, 4, 16), (1, 2, 13, 0, 5, 61)], ids=case_id)
def test_output_is_laid_out_b_lq_h_d(shape, backend, dtype):
    """out (B, H, Lq, D) is (B, Lq, H, D) memory, as the fake kernel says: out.transpose(1, 2) is
    contiguous, so the model's merge of the heads is a view of it, not a copy."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    B, H, Lq, _, _, D = shape
    inputs = make_inputs(*shape, dtype=dtype, device=helpers.backend_device(backend))
    out = K.asymmetric_attention(*inputs, backend=backend)
    assert out.transpose(1, 2).is_contiguous(), out.stride()
    merged = out.transpose(1, 2).reshape(B, Lq, H * D)  # enat.model.Attention.forward
    assert merged.data_ptr() == out.data_ptr() and merged._base is not None
    with FakeTensorMode() as mode:
        fakes = [mode.from_tensor(t) for t in inputs]
        fake_out, _ = torch.ops.enat.asymmetric_attention(*fakes, 0.5, backend or "reference")
    assert fake_out.stride() == out.stride()


def test_lq_zero_is_empty():
    inputs = make_inputs(2, 3, 0, 5, 4, 61)
    out, lse = K.asymmetric_attention(*inputs, return_lse=True)
    assert out.shape == (2, 3, 0, 61) and lse.shape == (2, 3, 0)
    assert lse.dtype == torch.float32


@pytest.mark.parametrize(
    "scale", [0.3, 1, 2.5, 0.0, -0.7, torch.tensor(0.25).item()], ids=["0.3", "int1", "2.5", "zero", "negative", "item"]
)
def test_scale_argument(scale):
    inputs = make_inputs(2, 2, 7, 17, 4, 61)
    out, lse = K.asymmetric_attention(*inputs, scale=scale, return_lse=True)
    check_forward(out, lse, inputs, scale=scale, what=f"scale={scale}")


def test_scale_default_is_inverse_sqrt_d():
    inputs = make_inputs(1, 2, 7, 5, 4, 61)
    a = K.asymmetric_attention(*inputs)
    b = K.asymmetric_attention(*inputs, scale=61**-0.5)
    c = K.asymmetric_attention(*inputs, scale=1.0)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_env_backend_switch(monkeypatch):
    inputs = make_inputs(1, 2, 7, 5, 4, 16)
    monkeypatch.setenv("ENAT_KERNELS_BACKEND", "reference")
    out = K.asymmetric_attention(*inputs)
    check_forward(out, None, inputs, what="env reference")
    monkeypatch.setenv("ENAT_KERNELS_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="ENAT_KERNELS_BACKEND"):
        K.asymmetric_attention(*inputs)


def test_forced_backend_that_cannot_serve_lists_why():
    inputs = make_inputs(1, 2, 7, 5, 4, 16)  # CPU tensors: no CUDA kernel can serve them
    with pytest.raises(BackendUnavailableError, match="cuda"):
        K.asymmetric_attention(*inputs, backend="cuda")


@helpers.needs_cpu_kernels
@pytest.mark.parametrize(("shape", "dtype", "pattern"), [
    ((1, 2, 7, 5, 4, 16), torch.float16, "take float32, float64, got float16"),
    ((2, 4, 64, 64, 64, 32), torch.float32, "is above the CPU kernel's"),
], ids=["fp16", "too_large"])
def test_forced_cpu_limits(shape, dtype, pattern):
    """What the C++ kernel refuses it says why; auto then runs the reference."""
    inputs = make_inputs(*shape, dtype=dtype)
    with pytest.raises(BackendUnavailableError, match=pattern):
        K.asymmetric_attention(*inputs, backend="cpu")
    assert enat_kernels.explain("asymmetric_attention", *inputs).chosen == "reference"


# Non-contiguous inputs.

LAYOUTS = {
    "heads_view": helpers.heads_view,
    "strided": helpers.strided,
    "padded": helpers.padded,
    "transposed_bh": lambda t: t.transpose(0, 1).contiguous().transpose(0, 1),
    "mixed": None,  # a different layout per input
}


@pytest.mark.parametrize(
    ("backend", "dtype"),
    backend_params(FORWARD, {"fp32": torch.float32, "fp16": torch.float16}),
)
@pytest.mark.parametrize("layout", list(LAYOUTS), ids=list(LAYOUTS))
@pytest.mark.parametrize("shape", [(2, 3, 7, 17, 4, 61), (3, 2, 13, 0, 5, 64), (1, 3, 1, 5, 0, 16)], ids=case_id)
def test_non_contiguous_inputs(shape, layout, dtype, backend):
    """Permuted, strided and NaN-padded views (NaN past each tensor's logical end) without copies."""
    inputs = make_inputs(*shape, dtype=dtype, device=helpers.backend_device(backend))
    if layout == "mixed":
        fns = [helpers.heads_view, helpers.strided, helpers.padded, helpers.heads_view, helpers.strided]
    else:
        fns = [LAYOUTS[layout]] * 5
    views = [fn(t) for fn, t in zip(fns, inputs)]
    for v, t in zip(views, inputs):
        assert torch.equal(v, t)
        assert v.stride(-1) == 1
    if layout in ("heads_view", "strided") or (layout == "transposed_bh" and shape[0] > 1):
        assert not views[0].is_contiguous()
    out, lse = K.asymmetric_attention(*views, return_lse=True, backend=backend)
    check_forward(out, lse, inputs, what=f"{layout} {backend}")
    # The same values through contiguous inputs give the same result, to rounding.
    ref = K.asymmetric_attention(*inputs, backend=backend)
    torch.testing.assert_close(out, ref)


def test_expanded_kv():
    """K/V shared across heads or batch (stride-0 views) are legal strides."""
    B, H, Lq, Lc, Ls, D = 3, 2, 7, 5, 4, 64
    q, kc, vc, ks, vs = make_inputs(B, H, Lq, Lc, Ls, D)
    kc, vc = kc[:, :1].expand(B, H, Lc, D), vc[:, :1].expand(B, H, Lc, D)
    ks, vs = ks[:1].expand(B, H, Ls, D), vs[:1].expand(B, H, Ls, D)
    out, lse = K.asymmetric_attention(q, kc, vc, ks, vs, return_lse=True)
    check_forward(out, lse, [q, kc, vc, ks, vs], what="expanded")


@pytest.mark.parametrize(("backend", "dtype"), backend_params(FORWARD, {"fp32": torch.float32}))
def test_large_scores_within_budget(backend, dtype):
    """Scores of magnitude ~1e2-1e3: no overflow to inf/NaN, and still within the error budget."""
    inputs = make_inputs(1, 2, 7, 5, 4, 16, dtype=dtype, device=helpers.backend_device(backend))
    inputs[0] = inputs[0] * 40
    out, lse = K.asymmetric_attention(*inputs, scale=2.0, return_lse=True, backend=backend)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    check_forward(out, lse, inputs, scale=2.0, what="large scores")


# Gradients.

GRAD_SHAPES = [(1, 2, 3, 2, 3, 16), (2, 1, 4, 0, 3, 16), (1, 1, 3, 4, 0, 16), (1, 1, 1, 1, 1, 17)]


@pytest.mark.parametrize("backend", ["reference", None], ids=["reference", "auto"])
@pytest.mark.parametrize("shape", GRAD_SHAPES, ids=[case_id(c) for c in GRAD_SHAPES])
def test_gradcheck_fp64(shape, backend):
    inputs = make_inputs(*shape, dtype=torch.float64, requires_grad=True)

    def f(*t):
        return K.asymmetric_attention(*t, scale=0.7, backend=backend)

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-8, rtol=1e-6)


GRAD_CASES = [(2, 3, 7, 17, 4, 61), (1, 2, 13, 0, 5, 64), (3, 1, 7, 5, 0, 128), (2, 2, 1, 1, 1, 16), (1, 2, 0, 5, 4, 16)]


@pytest.mark.parametrize(("backend", "dtype"), backend_params(FORWARD))
@pytest.mark.parametrize("shape", GRAD_CASES, ids=[case_id(c) for c in GRAD_CASES])
def test_gradients_match_oracle(shape, dtype, backend):
    """Gradients of all five inputs against the oracle's autograd gradients (budget factor 3).
    The forward's backend runs the backward where it has one (CUDA hands over to Triton)."""
    device = helpers.backend_device(backend)
    inputs = make_inputs(*shape, dtype=dtype, device=device, requires_grad=True)
    grad_out = torch.randn(inputs[0].shape, dtype=torch.float64).to(dtype=dtype, device=device)

    out = K.asymmetric_attention(*inputs, backend=backend)
    ours = torch.autograd.grad(out, inputs, grad_out, allow_unused=False)

    leaves64 = [t.detach().double().requires_grad_() for t in inputs]
    ref_out, _ = oracle.attention(*leaves64)
    ref = torch.autograd.grad(ref_out, leaves64, grad_out.double())

    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    naive = torch.autograd.grad(oracle.attention_same_dtype(*leaves), leaves, grad_out)
    scales = oracle.attention_error_scales(*inputs, grad_out=grad_out)

    for name, g, r, n, t in zip(NAMES, ours, ref, naive, inputs):
        assert g.shape == t.shape and g.dtype == t.dtype, f"{name}: grad {g.dtype}{list(g.shape)}"
        assert not torch.isnan(g).any(), f"{name}: NaN in grad"
        helpers.assert_within_budget(g, r, n, 3, what=f"d{name} {case_id(shape)} {dtype}", scale=scales[name])


def test_gradients_non_contiguous_inputs():
    inputs = make_inputs(2, 3, 7, 5, 4, 61, requires_grad=True)
    views = [helpers.heads_view(t.detach()).requires_grad_() for t in inputs]
    grad_out = torch.randn(inputs[0].shape)
    g_cont = torch.autograd.grad(K.asymmetric_attention(*inputs), inputs, grad_out)
    g_view = torch.autograd.grad(K.asymmetric_attention(*views), views, grad_out)
    for name, a, b in zip(NAMES, g_cont, g_view):
        torch.testing.assert_close(a, b, msg=f"d{name}")
        assert not torch.isnan(b).any()


def test_return_lse_under_autograd():
    """With inputs that require grad, out carries gradients and lse is still the right value."""
    inputs = make_inputs(1, 2, 3, 2, 2, 16, requires_grad=True)
    out, lse = K.asymmetric_attention(*inputs, return_lse=True)
    assert out.requires_grad
    check_forward(out.detach(), lse.detach(), [t.detach() for t in inputs], what="lse under autograd")


# torch.library.opcheck.


FP32 = {"fp32": torch.float32}


@pytest.mark.parametrize(("backend", "dtype"), backend_params(FORWARD, FP32))
@pytest.mark.parametrize(
    "shape", [(2, 3, 7, 17, 4, 61), (1, 2, 5, 0, 5, 16), (1, 2, 5, 5, 0, 16), (1, 1, 0, 3, 2, 16)], ids=case_id
)
def test_opcheck_forward(shape, backend, dtype):
    inputs = make_inputs(*shape, dtype=dtype, device=helpers.backend_device(backend), requires_grad=True)
    torch.library.opcheck(torch.ops.enat.asymmetric_attention.default, (*inputs, 0.37, backend))


@pytest.mark.parametrize(("backend", "dtype"), backend_params(BACKWARD, FP32))
@pytest.mark.parametrize("shape", [(2, 3, 7, 17, 4, 61), (1, 2, 5, 0, 5, 16)], ids=case_id)
def test_opcheck_backward(shape, backend, dtype):
    inputs = make_inputs(*shape, dtype=dtype, device=helpers.backend_device(backend))
    out, lse = torch.ops.enat.asymmetric_attention(*inputs, 0.37, backend)
    grad_out = torch.randn_like(out)
    torch.library.opcheck(
        torch.ops.enat.asymmetric_attention_backward.default, (grad_out, *inputs, out, lse, 0.37, backend)
    )


def test_op_backward_matches_oracle_gradients():
    """torch.ops.enat.asymmetric_attention_backward called directly gives the oracle's gradients."""
    inputs = make_inputs(2, 2, 7, 5, 4, 61, dtype=torch.float64)
    out, lse = torch.ops.enat.asymmetric_attention(*inputs, 0.37, "reference")
    grad_out = torch.randn_like(out)
    grads = torch.ops.enat.asymmetric_attention_backward(grad_out, *inputs, out, lse, 0.37, "reference")
    leaves = [t.clone().requires_grad_() for t in inputs]
    ref = torch.autograd.grad(oracle.attention(*leaves, scale=0.37)[0], leaves, grad_out)
    for name, g, r in zip(NAMES, grads, ref):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10, msg=f"d{name}")


# Bad input.


def _bad(**changes):
    """Valid fp32 inputs (B=2, H=3, Lq=4, Lc=5, Ls=6, D=16) with some replaced."""
    q, kc, vc, ks, vs = make_inputs(2, 3, 4, 5, 6, 16)
    return helpers.replaced(dict(q=q, k_ctx=kc, v_ctx=vc, k_self=ks, v_self=vs), changes)


BAD_INPUTS = {
    # name: (changes, exception, message pattern)
    "q_rank3": (dict(q=lambda t: t[0]), ValueError, r"q.*\[3, 4, 16\]"),
    "k_self_rank5": (dict(k_self=lambda t: t[None]), ValueError, r"k_self.*\[1, 2, 3, 6, 16\]"),
    "v_ctx_rank2": (dict(v_ctx=lambda t: t[0, 0]), ValueError, "v_ctx"),
    "k_ctx_batch": (dict(k_ctx=lambda t: torch.cat([t, t])), ValueError, r"k_ctx.*\[4, 3, 5, 16\]"),
    "v_self_heads": (dict(v_self=lambda t: t[:, :2]), ValueError, r"v_self.*\[2, 2, 6, 16\]"),
    "k_self_head_dim": (dict(k_self=lambda t: t[..., :8]), ValueError, r"k_self.*\[2, 3, 6, 8\]"),
    "v_ctx_head_dim": (dict(v_ctx=lambda t: torch.cat([t, t], -1)), ValueError, "v_ctx"),
    "v_ctx_len": (dict(v_ctx=lambda t: t[:, :, :4]), ValueError, r"v_ctx.*\[2, 3, 4, 16\]"),
    "v_self_len": (dict(v_self=lambda t: t[:, :, :0]), ValueError, "v_self"),
    "both_empty": (dict(k_ctx=lambda t: t[:, :, :0], v_ctx=lambda t: t[:, :, :0], k_self=lambda t: t[:, :, :0],
                        v_self=lambda t: t[:, :, :0]), ValueError, "k_ctx|k_self"),
    "mixed_dtype": (dict(v_self=lambda t: t.half()), TypeError, r"v_self.*float16"),
    "mixed_dtype_q": (dict(q=lambda t: t.double()), TypeError, r"q|k_ctx"),
    "int_dtype": (dict(q=lambda t: t.long(), k_ctx=lambda t: t.long(), v_ctx=lambda t: t.long(),
                       k_self=lambda t: t.long(), v_self=lambda t: t.long()), TypeError, r"q.*int64"),
    "bool_dtype": (dict(q=lambda t: t > 0, k_ctx=lambda t: t > 0, v_ctx=lambda t: t > 0,
                        k_self=lambda t: t > 0, v_self=lambda t: t > 0), TypeError, "q"),
    "non_tensor_q": (dict(q=lambda t: t.tolist()), TypeError, "q"),
    "non_tensor_v_self": (dict(v_self=None), TypeError, "v_self"),
    "non_tensor_k_ctx": (dict(k_ctx=3.0), TypeError, "k_ctx"),
    "mixed_device": (dict(k_ctx=lambda t: t.to("meta")), ValueError, "k_ctx"),
    "scale_str": (dict(scale="0.5"), TypeError, "scale"),
    "scale_tensor": (dict(scale=[0.5]), TypeError, "scale"),
    "scale_bool": (dict(scale=True), TypeError, "scale"),
    "scale_complex": (dict(scale=1j), TypeError, "scale"),
    "scale_nan": (dict(scale=float("nan")), ValueError, "scale"),
    "scale_inf": (dict(scale=math.inf), ValueError, "scale"),
    "backend_unknown": (dict(backend="cudnn"), ValueError, "backend"),
    "backend_case": (dict(backend="Reference"), ValueError, "backend"),
    "backend_type": (dict(backend=3), (ValueError, TypeError), "backend"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input(name):
    changes, exc, pattern = BAD_INPUTS[name]
    args, kwargs = _bad(**changes)
    with pytest.raises(exc, match=pattern):
        K.asymmetric_attention(**args, **kwargs)

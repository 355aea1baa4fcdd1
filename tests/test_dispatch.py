"""Backend selection: what each backend says it can serve, forcing, and the errors when it cannot."""

import pytest
import torch

import enat_kernels.ops as K
from enat_kernels import BackendUnavailableError, _library, triton_utils
from enat_kernels.backends import ENV_BACKEND
from enat_kernels.ops.asymmetric_attention import BACKWARD, FORWARD
from enat_kernels.ops.gather_scatter import GATHER, SCATTER, SCATTER_ZEROS

from helpers import needs_triton, triton_device

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def _tokens(B=2, L=6, D=4, n=3):
    x = torch.randn(B, L, D)
    index = torch.stack([torch.sort(torch.randperm(L)[:n]).values for _ in range(B)])
    return x, index


def test_cpu_tensors_use_the_reference_by_default():
    x, index = _tokens()
    assert GATHER.select(None, CPU, x, index) == "reference"


def test_cuda_tensors_prefer_cuda_then_triton_then_reference(monkeypatch):
    """The order of preference and the per-kernel limits, checked on the selection rule itself."""
    x, index = _tokens()
    x_t = torch.randn(2, 4, 6).transpose(1, 2)  # last dim not contiguous: the CUDA kernel declines
    monkeypatch.setattr(_library, "EXTENSION_LOADED", True)
    monkeypatch.setattr(triton_utils, "INTERPRET", False)
    assert GATHER.select(None, CUDA, x, index) == "cuda"
    if triton_utils.triton is not None:
        assert GATHER.select(None, CUDA, x_t, index) == "triton"
        assert SCATTER.select(None, CUDA, x, index, x[:, :3]) == "cuda"
        assert SCATTER.select(None, CUDA, x_t, index, x_t[:, :3]) == "triton"
    assert GATHER.select(None, CUDA, x.bool(), index) == "cuda"  # the CUDA copy moves any dtype
    monkeypatch.setattr(_library, "EXTENSION_LOADED", False)
    monkeypatch.setattr(_library, "EXTENSION_ERROR", "extension not built")
    expected = "reference" if triton_utils.triton is None else "triton"
    assert GATHER.select(None, CUDA, x, index) == expected
    assert GATHER.select(None, CUDA, x.bool(), index) == "reference"  # no Triton kernel moves bool


def test_attention_on_cuda_tensors_prefers_triton_then_cuda(monkeypatch):
    """Until the CUDA forward is measured on a GPU, Triton goes first; each declares its limits."""
    q = torch.randn(1, 2, 3, 64)
    monkeypatch.setattr(_library, "EXTENSION_LOADED", True)
    monkeypatch.setattr(triton_utils, "INTERPRET", False)
    if triton_utils.triton is not None:
        assert FORWARD.select(None, CUDA, q, q, q, q, q, 0.125) == "triton"
    monkeypatch.setattr(triton_utils, "triton", None)
    monkeypatch.setattr(triton_utils, "IMPORT_ERROR", "no triton")
    assert FORWARD.select(None, CUDA, q, q, q, q, q, 0.125) == "cuda"
    wide = torch.randn(1, 2, 3, 160)  # head dim above both kernels' 128
    assert FORWARD.select(None, CUDA, wide, wide, wide, wide, wide, 0.1) == "reference"
    with pytest.raises(BackendUnavailableError, match="head dim 160 is above the CUDA kernels' 128"):
        FORWARD.select("cuda", CUDA, wide, wide, wide, wide, wide, 0.1)
    double = q.double()
    with pytest.raises(BackendUnavailableError, match="take float16, bfloat16, float32, got float64"):
        FORWARD.select("cuda", CUDA, double, double, double, double, double, 0.1)


def test_forced_backend_that_cannot_serve_lists_the_reasons(monkeypatch):
    x, index = _tokens()
    monkeypatch.setattr(_library, "EXTENSION_LOADED", False)
    monkeypatch.setattr(_library, "EXTENSION_ERROR", "the CUDA extension enat_kernels._C is not built")
    with pytest.raises(BackendUnavailableError) as info:
        K.gather_tokens(x, index, backend="cuda")
    message = str(info.value)
    assert "backend='cuda' cannot serve enat::gather_tokens" in message
    assert "the CUDA backend runs on CUDA tensors, these are on cpu" in message
    assert "enat_kernels._C is not built" in message


def test_forcing_an_op_without_that_kernel_says_so():
    q = torch.randn(1, 2, 3, 16)
    args = (q, q, q, q, q, q, q, q[..., 0], 0.25)  # grad_out, q, k/v ctx, k/v self, out, lse, scale
    with pytest.raises(BackendUnavailableError, match="no cuda kernel for asymmetric_attention_backward"):
        BACKWARD.select("cuda", CPU, *args)


def test_environment_variable_forces_a_backend(monkeypatch):
    x, index = _tokens()
    monkeypatch.setenv(ENV_BACKEND, "cuda")
    with pytest.raises(BackendUnavailableError, match=f"{ENV_BACKEND}=cuda cannot serve"):
        K.gather_tokens(x, index)
    monkeypatch.setenv(ENV_BACKEND, "reference")
    assert torch.equal(K.gather_tokens(x, index), torch.gather(x, 1, index[..., None].expand(-1, -1, 4)))
    monkeypatch.setenv(ENV_BACKEND, "auto")
    assert GATHER.select(None, CPU, x, index) == "reference"


def test_argument_wins_over_environment(monkeypatch):
    x, index = _tokens()
    monkeypatch.setenv(ENV_BACKEND, "cuda")
    assert GATHER.select("reference", CPU, x, index) == "reference"


@pytest.mark.parametrize("bad", ["gpu", "CUDA", ""])
def test_unknown_backend_names(monkeypatch, bad):
    x, index = _tokens()
    with pytest.raises(ValueError, match="backend must be one of 'cuda', 'triton', 'reference'"):
        K.gather_tokens(x, index, backend=bad)
    if bad:
        monkeypatch.setenv(ENV_BACKEND, bad)
        with pytest.raises(ValueError, match=f"{ENV_BACKEND} must be one of"):
            K.gather_tokens(x, index)


def test_direct_op_call_checks_the_backend_string():
    x, index = _tokens()
    with pytest.raises(ValueError, match="enat::gather_tokens: backend must be one of"):
        torch.ops.enat.gather_tokens(x, index, "fastest")
    with pytest.raises(BackendUnavailableError, match="backend 'cuda' cannot serve enat::gather_tokens"):
        torch.ops.enat.gather_tokens(x, index, "cuda")


def test_every_op_has_a_reference_on_cpu():
    q = torch.randn(1, 2, 3, 16)
    assert FORWARD.select(None, CPU, q, q, q, q, q, 0.25) == "reference"


@needs_triton
def test_triton_on_cpu_only_when_forced_under_the_interpreter():
    x, index = _tokens()
    if triton_device() != "cpu":
        pytest.skip("Triton compiles for the GPU in this session; the interpreter rule applies to GPU-less runs")
    assert GATHER.select(None, CPU, x, index) == "reference"
    assert GATHER.select("triton", CPU, x, index) == "triton"
    out = K.gather_tokens(x, index, backend="triton")
    assert torch.equal(out, torch.gather(x, 1, index[..., None].expand(-1, -1, 4)))


@needs_triton
def test_backward_keeps_the_forward_backend_when_it_can(monkeypatch):
    """A Triton gather's backward runs the Triton scatter into zeros; a backend that cannot serve the
    backward's inputs hands over to the next that can."""
    device = triton_device()
    x, index = _tokens()
    x, index = x.to(device), index.to(device)
    calls = []
    for name in ("triton", "reference"):
        impl = SCATTER_ZEROS.impls[name]
        monkeypatch.setitem(SCATTER_ZEROS.impls, name, impl._replace(run=lambda *a, _n=name, _f=impl.run: calls.append(_n) or _f(*a)))
    x.requires_grad_(True)
    K.gather_tokens(x, index, backend="triton").sum().backward()
    assert calls == ["triton"]
    expected = torch.zeros_like(x)
    expected.scatter_(1, index[..., None].expand(-1, -1, x.shape[2]), 1.0)
    assert torch.equal(x.grad, expected)
    assert SCATTER.select(None, CPU, x, index, torch.zeros(2, 3, 4), preferred="cuda") == "reference"

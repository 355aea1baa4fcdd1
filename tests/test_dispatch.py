"""Backend selection: what each backend says it can serve, forcing, and the errors when it cannot."""

import warnings

import pytest
import torch

import enat_kernels
import enat_kernels.ops as K
from enat_kernels import BackendUnavailableError, FallbackWarning, _library, backends, triton_utils
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


def test_cuda_tensors_prefer_triton_then_cuda_then_reference(monkeypatch):
    """The order of preference (Triton first: the kernels the interpreter checks in every test run)
    and the per-kernel limits, checked on the selection rule itself."""
    x, index = _tokens()
    x_t = torch.randn(2, 4, 6).transpose(1, 2)  # last dim not contiguous: the CUDA kernel declines
    monkeypatch.setattr(_library, "EXTENSION_LOADED", True)
    monkeypatch.setattr(triton_utils, "INTERPRET", False)
    first = "cuda" if triton_utils.triton is None else "triton"
    assert GATHER.select(None, CUDA, x, index) == first
    assert SCATTER.select(None, CUDA, x, index, x[:, :3]) == first
    if triton_utils.triton is not None:
        assert GATHER.select(None, CUDA, x_t, index) == "triton"
    assert GATHER.select(None, CUDA, x.bool(), index) == "cuda"  # no Triton kernel moves bool; the CUDA copy does
    monkeypatch.setattr(triton_utils, "triton", None)
    monkeypatch.setattr(triton_utils, "IMPORT_ERROR", "no triton")
    assert GATHER.select(None, CUDA, x, index) == "cuda"
    monkeypatch.setattr(_library, "EXTENSION_LOADED", False)
    monkeypatch.setattr(_library, "EXTENSION_ERROR", "extension not built")
    with pytest.warns(FallbackWarning):
        assert GATHER.select(None, CUDA, x, index) == "reference"


def test_attention_on_cuda_tensors_prefers_triton_then_cuda(monkeypatch):
    """Until the CUDA forward is measured on a GPU, Triton goes first; each declares its limits."""
    monkeypatch.setattr(backends, "_WARNED", set())
    q = torch.randn(1, 2, 3, 64)
    monkeypatch.setattr(_library, "EXTENSION_LOADED", True)
    monkeypatch.setattr(triton_utils, "INTERPRET", False)
    if triton_utils.triton is not None:
        assert FORWARD.select(None, CUDA, q, q, q, q, q, 0.125) == "triton"
    monkeypatch.setattr(triton_utils, "triton", None)
    monkeypatch.setattr(triton_utils, "IMPORT_ERROR", "no triton")
    assert FORWARD.select(None, CUDA, q, q, q, q, q, 0.125) == "cuda"
    wide = torch.randn(1, 2, 3, 160)  # head dim above both kernels' 128
    with pytest.warns(FallbackWarning, match="head dim 160 is above the CUDA kernels' 128"):
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
    with pytest.raises(ValueError, match="backend must be one of " + ", ".join(map(repr, enat_kernels.BACKENDS))):
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


def test_cpu_tensors_take_the_cpu_kernels_else_the_reference(monkeypatch):
    q = torch.randn(1, 2, 3, 16)
    if _library.CPU is not None:
        assert FORWARD.select(None, CPU, q, q, q, q, q, 0.25) == "cpu"
    assert FORWARD.select(None, CPU, q.half(), q.half(), q.half(), q.half(), q.half(), 0.25) == "reference"
    monkeypatch.setattr(_library, "CPU", None)
    monkeypatch.setattr(_library, "CPU_ERROR", "the CPU kernels enat_kernels._cpu are not built")
    assert FORWARD.select(None, CPU, q, q, q, q, q, 0.25) == "reference"
    assert "enat_kernels._cpu are not built" in " ".join(FORWARD.reasons("cpu", CPU, (q, q, q, q, q, 0.25)))


@needs_triton
def test_triton_on_cpu_only_when_forced_under_the_interpreter():
    x, index = _tokens()
    if triton_device() != "cpu":
        pytest.skip("Triton compiles for the GPU in this run; the interpreter rule applies to GPU-less runs")
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


def test_fallback_warning_once_per_op_and_reasons(monkeypatch):
    """A CUDA tensor that no kernel serves runs on the reference with one FallbackWarning naming the
    reasons; the same reasons again stay silent, other reasons warn again."""
    monkeypatch.setattr(backends, "_WARNED", set())
    monkeypatch.setattr(_library, "EXTENSION_LOADED", True)
    monkeypatch.setattr(triton_utils, "INTERPRET", False)
    wide = torch.randn(1, 2, 3, 160)
    with pytest.warns(FallbackWarning) as record:
        FORWARD.select(None, CUDA, wide, wide, wide, wide, wide, 0.1)
        FORWARD.select(None, CUDA, *[wide[:, :1]] * 5, 0.1)  # another signature, the same reasons
    assert len(record) == 1
    message = str(record[0].message)
    assert "enat::asymmetric_attention runs on the reference backend" in message
    assert "cuda: head dim 160 is above the CUDA kernels' 128" in message
    double = torch.randn(1, 2, 3, 16, dtype=torch.float64)
    with pytest.warns(FallbackWarning, match="got float64"):
        FORWARD.select(None, CUDA, double, double, double, double, double, 0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # CPU tensors are the reference's by design: no warning
        assert FORWARD.select(None, CPU, double, double, double, double, double, 0.1) == "reference"


def test_explain_names_the_backend_and_every_reason(monkeypatch):
    x, index = _tokens()
    monkeypatch.setattr(_library, "EXTENSION_LOADED", False)
    monkeypatch.setattr(_library, "EXTENSION_ERROR", "the CUDA extension enat_kernels._C is not built")
    monkeypatch.setattr(_library, "CPU", None)
    for op in (K.gather_tokens, "gather_tokens"):
        explanation = enat_kernels.explain(op, x, index)
        assert explanation.op == "gather_tokens" and explanation.chosen == "reference"
        assert explanation.reasons["reference"] == []
        assert "the CUDA backend runs on CUDA tensors, these are on cpu" in explanation.reasons["cuda"]
        assert "enat_kernels._C is not built" in " ".join(explanation.reasons["cuda"])
        assert explanation.reasons["triton"]  # CPU tensors go to Triton only when forced under the interpreter
        assert "gather_tokens runs on reference" in str(explanation)
    q = torch.randn(1, 2, 3, 16)
    assert enat_kernels.explain(K.asymmetric_attention, q, q, q, q, q, return_lse=True).chosen == "reference"
    assert enat_kernels.explain(K.adaln, x, x[:, 0], x[:, 0], eps=1e-5).op == "adaln"
    assert enat_kernels.explain("split_tokens", x, torch.zeros(2, 6, dtype=torch.bool), 0).op == "split_tokens"
    with pytest.raises(ValueError, match="index must have 2 dimensions"):
        enat_kernels.explain(K.gather_tokens, x, index[0])
    with pytest.raises(ValueError, match="op must be a public function of enat_kernels.ops"):
        enat_kernels.explain("softmax", x)
    with pytest.raises(ValueError, match="op must be a public function of enat_kernels.ops"):
        enat_kernels.explain(torch.gather, x, 1, index)


def _recording_op(monkeypatch, entry):
    calls = []
    op = entry.op
    monkeypatch.setattr(entry, "op", lambda *a: calls.append(a[-1]) or op(*a))
    return calls


def test_inference_calls_run_the_kernel_without_the_registered_op(monkeypatch):
    """Outside autograd, tracing and dispatch modes the public op calls the chosen implementation
    directly (same result, same value checks); otherwise it goes through torch.ops.enat."""
    from torch.utils.flop_counter import FlopCounterMode

    from enat_kernels.ops import gather_scatter

    x, index = _tokens()
    expected = torch.gather(x, 1, index[..., None].expand(-1, -1, 4))
    calls = _recording_op(monkeypatch, gather_scatter._GATHER)
    with torch.no_grad():
        assert torch.equal(K.gather_tokens(x, index), expected)
    assert torch.equal(K.gather_tokens(x, index), expected)  # grad mode on, nothing requires grad
    assert calls == []
    with torch.no_grad(), pytest.raises(ValueError, match="strictly ascending"):
        K.gather_tokens(x, index.flip(1))  # value checks run on the direct path too
    x.requires_grad_(True)
    out = K.gather_tokens(x, index)
    assert calls == ["reference"] and out.grad_fn is not None
    with torch.no_grad(), FlopCounterMode(display=False):
        K.gather_tokens(x, index)
    assert calls == ["reference", "reference"]


def test_clear_caches_forgets_plans_and_choices():
    x, index = _tokens()
    K.gather_tokens(x, index)
    assert any(backends.CACHES)
    enat_kernels.clear_caches()
    assert not any(backends.CACHES)
    assert torch.equal(K.gather_tokens(x, index), torch.gather(x, 1, index[..., None].expand(-1, -1, 4)))

"""Adding a backend by the steps of docs/OPS.md ("Adding a backend"): a Backend subclass, its
registration (enat_kernels.backends.add), one implementation per op it serves (Dispatcher.register);
then it is chosen, forced, explained and refused like the built-in ones, and removed without a trace.
Last, adding an op by the steps of "Adding an op", in a namespace of its own."""

import pytest
import torch

import enat_kernels
import enat_kernels.ops as K
from enat_kernels import BackendUnavailableError, backends
from enat_kernels.backends import ENV_BACKEND
from enat_kernels.ops.gather_scatter import GATHER

import oracle


class Toy(backends.Backend):
    """A backend of CPU tensors."""

    name = "toy"

    def device_reasons(self, device, forced):
        return [] if device.type == "cpu" else [f"the toy backend runs on CPU tensors, these are on {device.type}"]


def _why_not(x, index):
    return [] if x.dtype == torch.float32 else [f"the toy gather moves float32 only, got {x.dtype}"]


@pytest.fixture
def toy():
    """The toy backend with a gather_tokens kernel (torch.gather), registered ahead of the reference for
    the test only; returns the list of the toy kernel's calls."""
    calls = []

    def gather(x, index):
        calls.append(tuple(x.shape))
        return torch.gather(x, 1, index.unsqueeze(-1).expand(-1, -1, x.shape[2]))

    backends.add(Toy(), before="reference")
    try:
        GATHER.register("toy", gather, _why_not)
        yield calls
    finally:
        backends.remove("toy")


def _tokens(dtype=torch.float32, B=2, L=7, n=3, D=5):
    return oracle.random_tensor((B, L, D), dtype), oracle.random_index(B, L, n)


def test_a_new_backend_is_listed_in_the_order_of_preference(toy):
    assert enat_kernels.BACKENDS == backends.ORDER == tuple(backends.REGISTRY)
    assert enat_kernels.BACKENDS[-2:] == ("toy", "reference")
    assert "toy" in GATHER.order


def test_forced_it_serves_its_op(toy, monkeypatch):
    x, index = _tokens()
    assert torch.equal(K.gather_tokens(x, index, backend="toy"), oracle.gather(x, index))
    x.requires_grad_(True)  # through torch.ops.enat.gather_tokens and autograd: no toy backward, the next serves
    out = K.gather_tokens(x, index, backend="toy")
    out.backward(torch.ones_like(out))
    assert torch.equal(x.grad, oracle.scatter(torch.zeros_like(x), index, torch.ones_like(out)))
    monkeypatch.setenv(ENV_BACKEND, "toy")
    assert torch.equal(K.gather_tokens(x.detach(), index), oracle.gather(x.detach(), index))
    assert len(toy) == 3


def test_chosen_where_it_comes_first_and_can_serve(toy):
    """On CPU tensors the toy backend precedes the reference (Triton's interpreter serves only when
    forced, the cpu backend has no gather): float32 takes it, float64 goes on to the reference."""
    x, index = _tokens()
    explanation = enat_kernels.explain(K.gather_tokens, x, index)
    assert explanation.chosen == "toy" and explanation.reasons["toy"] == []
    assert "toy: can serve" in str(explanation)
    assert torch.equal(K.gather_tokens(x, index), oracle.gather(x, index)) and toy == [tuple(x.shape)]
    x64 = x.double()
    explanation = enat_kernels.explain("gather_tokens", x64, index)
    assert explanation.chosen == "reference"
    assert explanation.reasons["toy"] == ["the toy gather moves float32 only, got torch.float64"]
    assert torch.equal(K.gather_tokens(x64, index), oracle.gather(x64, index)) and len(toy) == 1


def test_refused_with_reasons_where_it_cannot_serve(toy):
    x, index = _tokens()
    with pytest.raises(BackendUnavailableError, match="the toy gather moves float32 only, got torch.float64"):
        K.gather_tokens(x.double(), index, backend="toy")
    with pytest.raises(BackendUnavailableError, match="the toy backend runs on CPU tensors, these are on meta"):
        K.gather_tokens(x.to("meta"), index.to("meta"), backend="toy")
    with pytest.raises(BackendUnavailableError, match="enat_kernels has no toy kernel for scatter_tokens"):
        K.scatter_tokens(x, index, x[:, :3], backend="toy")
    assert enat_kernels.explain(K.scatter_tokens, x, index, x[:, :3]).reasons["toy"] == [
        "enat_kernels has no toy kernel for scatter_tokens"]
    assert toy == []


def test_registration_rules(toy):
    with pytest.raises(ValueError, match="already registered"):
        backends.add(Toy())
    with pytest.raises(TypeError, match="Backend instance"):
        backends.add("toy2")
    with pytest.raises(ValueError, match="unknown backend 'toy2': register it first"):
        GATHER.register("toy2", lambda x, index: x)


def test_removed_without_a_trace():
    x, index = _tokens()
    before = backends.BACKENDS
    backends.add(Toy(), before=None)
    try:
        GATHER.register("toy", lambda x, index: torch.zeros(()), None)
        assert backends.BACKENDS == before + ("toy",)
        assert K.gather_tokens(x, index).shape == (2, 3, 5)  # last in the order: the reference comes first
        assert enat_kernels.explain(K.gather_tokens, x, index).chosen == "reference"
    finally:
        backends.remove("toy")
    assert backends.BACKENDS == enat_kernels.BACKENDS == before
    assert all("toy" not in d.impls for d in backends.DISPATCHERS.values())
    assert "toy" not in enat_kernels.explain(K.gather_tokens, x, index).reasons
    with pytest.raises(ValueError, match="backend must be one of"):
        K.gather_tokens(x, index, backend="toy")
    with pytest.raises(ValueError, match="no backend 'toy' is registered"):
        backends.remove("toy")


# Adding an op by the steps of docs/OPS.md ("Adding an op"), in a namespace of its own: scale_rows(x, w)
# = x * w[b] for x (B, L, D), w (B,), with a reference and a toy-backend kernel.


def scale_rows_reference(x, w):
    return x * w[:, None, None]


def scale_rows_toy(x, w):
    return torch.einsum("bld,b->bld", x, w)


def _validate(x, w):
    enat_kernels.checks.tensor("x", x, "B L D")
    enat_kernels.checks.tensor("w", w, "B")
    enat_kernels.checks.size_equal("w", w, 0, "x", x, 0)
    return x, w


@pytest.fixture(scope="module")
def scale_rows():
    """The public function of the op, defined and registered for this module's tests, then taken back out
    of the package's registries (the library's registrations with it)."""
    from enat_kernels._library import define
    from enat_kernels.backends import Dispatcher, Entry

    backends.add(Toy(), before="reference")
    dispatcher = Dispatcher("scale_rows")
    dispatcher.register("reference", scale_rows_reference)
    dispatcher.register("toy", scale_rows_toy, lambda x, w: [] if x.dtype == torch.float32 else ["float32 only"])
    lib = torch.library.Library("enat_example", "DEF")
    op = define("scale_rows(Tensor x, Tensor w, str backend) -> Tensor",
                lambda x, w, backend: dispatcher.run(backend, x.device, x, w), lambda x, w, backend: torch.empty_like(x),
                lib=lib)

    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        return op(grad, w, ctx.backend), (grad * x).sum((1, 2)), None

    def setup(ctx, inputs, output):
        ctx.save_for_backward(inputs[0], inputs[1])
        ctx.backend = inputs[2]

    torch.library.register_autograd("enat_example::scale_rows", backward, setup_context=setup, lib=lib)
    entry = Entry(dispatcher, _validate, op)

    def public(x, w, *, backend=None):
        """x (B, L, D) with each batch row b scaled by w[b] (B,)."""
        return entry(x, w, backend=backend)

    try:
        yield public
    finally:
        backends.DISPATCHERS.pop("scale_rows")
        backends.ENTRIES.pop("scale_rows")
        backends.remove("toy")
        lib._destroy()


def test_a_new_op_runs_on_its_backends(scale_rows):
    x, w = torch.randn(2, 5, 3), torch.randn(2)
    expected = x.double() * w.double()[:, None, None]
    for backend in (None, "toy", "reference"):
        torch.testing.assert_close(scale_rows(x, w, backend=backend).double(), expected)
    assert torch.equal(scale_rows(x.double(), w.double()), scale_rows_reference(x.double(), w.double()))
    with pytest.raises(BackendUnavailableError, match="float32 only"):
        scale_rows(x.double(), w.double(), backend="toy")
    with pytest.raises(ValueError, match="w"):
        scale_rows(x, torch.randn(3))


def test_a_new_op_has_gradients_and_compiles(scale_rows):
    x = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: scale_rows(x, w, backend="reference"), (x, w))
    torch._dynamo.reset()
    compiled = torch.compile(lambda x, w: scale_rows(x, w) * 2, fullgraph=True)
    x32, w32 = x.detach().float(), w.detach().float()
    torch.testing.assert_close(compiled(x32, w32), 2 * scale_rows_reference(x32, w32))

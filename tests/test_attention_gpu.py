"""asymmetric_attention kernels on a GPU: determinism, torch.compile, CUDA-graph capture and 64-bit
offsets. Accuracy on every backend is in test_attention.py; these properties need a real GPU."""

import sys

import pytest
import torch

import enat_kernels.ops as K
from enat_kernels.backends import BackendUnavailableError

import helpers
from test_attention import check_forward, make_inputs

pytestmark = helpers.needs_gpu
A = sys.modules["enat_kernels.ops.asymmetric_attention"]

KERNELS = ["triton", "cuda"]
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
SHAPE = (4, 6, 77, 51, 77, 64)  # B, H, Lq, Lc, Ls, D: several tiles, ragged edges


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("backend", KERNELS)
def test_two_runs_are_bitwise_equal(backend, dtype):
    shape = SHAPE if dtype != torch.float32 else (*SHAPE[:5], A.TRITON_FP32_MAX_D)  # what Triton takes in fp32
    inputs = make_inputs(*shape, dtype=dtype, device="cuda", requires_grad=True)
    grad_out = torch.randn_like(inputs[0])
    runs = []
    for _ in range(2):
        out, lse = K.asymmetric_attention(*inputs, return_lse=True, backend=backend)
        grads = torch.autograd.grad(out, inputs, grad_out)
        runs.append((out, lse, *grads))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", KERNELS)
def test_compile_fullgraph_forward_and_backward(backend):
    inputs = make_inputs(*SHAPE, dtype=torch.float16, device="cuda", requires_grad=True)

    def f(q, kc, vc, ks, vs):
        return (K.asymmetric_attention(q, kc, vc, ks, vs, backend=backend) * 2).sum()

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)
    eager_grads = torch.autograd.grad(f(*inputs), inputs)
    compiled_grads = torch.autograd.grad(compiled(*inputs), inputs)
    for a, b in zip(eager_grads, compiled_grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", KERNELS)
def test_cuda_graph_capture_and_replay(backend):
    inputs = make_inputs(*SHAPE, dtype=torch.float16, device="cuda")
    K.asymmetric_attention(*inputs, backend=backend)  # compile / autotune outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = K.asymmetric_attention(*inputs, backend=backend)
    for t in inputs:
        t.copy_(torch.randn_like(t))
    graph.replay()
    torch.cuda.synchronize()
    check_forward(out, None, inputs, what=f"graph replay {backend}")


@pytest.mark.parametrize("backend", KERNELS)
def test_offsets_past_2_to_the_31(backend):
    """A batch stride of 2^31 elements: batch and head offsets must be 64-bit."""
    B, H, Lq, Lc, D = 2, 1, 16, 16, 64
    storage = torch.randn(2**31 + Lq * D, dtype=torch.float16, device="cuda")
    big = storage.as_strided((B, H, Lc, D), (2**31, Lc * D, D, 1))
    q, kc, vc, ks, vs = make_inputs(B, H, Lq, Lc, Lq, D, dtype=torch.float16, device="cuda")
    out, lse = K.asymmetric_attention(q, big, vc, ks, vs, return_lse=True, backend=backend)
    check_forward(out, lse, [q, big, vc, ks, vs], what=f"64-bit offsets {backend}")
    del storage, big


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_cuda_and_triton_agree_with_the_oracle_at_enat_shapes(dtype):
    """ENAT-S's head dim 61 and ENAT-L's 64, at a decoder split of L=256."""
    for D in (61, 64):
        inputs = make_inputs(2, 4, 128, 128, 128, D, dtype=dtype, device="cuda")
        for backend in KERNELS:
            if backend == "triton" and dtype == torch.float32:
                with pytest.raises(BackendUnavailableError, match="spill registers"):  # above TRITON_FP32_MAX_D
                    K.asymmetric_attention(*inputs, backend=backend)
                continue
            out, lse = K.asymmetric_attention(*inputs, return_lse=True, backend=backend)
            check_forward(out, lse, inputs, what=f"{backend} D={D}")


# (B, H, Lq, Lc, Ls, D) of ENAT-L: training decoder and encoder (mask ratio 0.8 of 256 tokens), a reuse
# step's encoder (critical tokens over the cache), and 512-px decoder steps (1024 tokens).
MODEL_SHAPES = [(4, 16, 205, 51, 205, 64), (4, 16, 51, 0, 51, 64), (4, 16, 20, 180, 20, 64),
                (2, 16, 1004, 20, 1004, 64), (2, 16, 196, 828, 196, 64)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("shape", MODEL_SHAPES, ids=lambda s: "B{}H{}-Lq{}-Lc{}-Ls{}-D{}".format(*s))
def test_gradients_at_model_shapes(shape, backend, dtype):
    """Forward and all five gradients against the fp64 oracle at the model's own shapes, with the
    model's layout (heads split from a projection output: permuted, strided views)."""
    from test_attention_triton import check_gradients

    inputs = [helpers.heads_view(t) for t in make_inputs(*shape, dtype=dtype, device="cuda")]
    leaves = [t.detach().requires_grad_() for t in inputs]
    out, lse = K.asymmetric_attention(*leaves, return_lse=True, backend=backend)
    check_forward(out.detach(), lse, inputs, what=f"{backend} {shape}")
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, grad_out)
    check_gradients(grads, inputs, grad_out, shape[-1] ** -0.5, f"{backend} {shape}")

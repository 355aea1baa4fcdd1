"""The fused adaLN ops (enat_kernels.ops.adaln) against the unfused PyTorch they replace in a DiT block
(enat/model.py, Block): F.layer_norm then modulate for adaln; x + gate * y, then F.layer_norm and
modulate for residual_adaln.

Shapes (GPU), ENAT-L (d = 1024): generation, forward only, B = 256 rows (128 images with guidance) at
L = 51, 205 and 256 tokens, fp16; training, forward and forward+backward, B = 128, L = 256, bf16. On a
CPU: B = 2, L = 16, d = 64, fp32 (the Triton provider skips there: the interpreter runs only in tests).
Every provider gets the model's layout: gate, shift and scale are column views of one (B, 8d)
modulation tensor, whose gradient the backward produces.

Bytes per call (what the fused op must move; (B, d) rows counted once): adaln forward reads x and
writes out (2 BLd elements), its backward reads grad_out and x and writes dx (3 BLd); residual_adaln
forward reads x, y and writes x_new, out (4 BLd), its backward reads both output gradients, x_new and
y and writes dx, dy (6 BLd). GB/s = bytes / GPU time, the same bytes for every provider.
"""

import pytest
import torch
import torch.nn.functional as F

import enat_kernels.ops as K
from harness import DEVICE, ON_GPU, measure

EPS = 1e-6
if ON_GPU:
    D = 1024
    CASES = [("generation", 256, L, torch.float16, ("fwd",)) for L in (51, 205, 256)]
    CASES.append(("training", 128, 256, torch.bfloat16, ("fwd", "fwd+bwd")))
else:
    D = 64
    CASES = [("cpu", 2, 16, torch.float32, ("fwd", "fwd+bwd"))]

ENAT = {"enat-auto": None, "enat-triton": "triton"}
PROVIDERS = [*ENAT, "torch"]
BASELINE = "torch"
ELEMENTS = {("adaln", "fwd"): 2, ("adaln", "bwd"): 3, ("residual_adaln", "fwd"): 4, ("residual_adaln", "bwd"): 6}
ROW_TENSORS = {"adaln": 2, "residual_adaln": 3}


def _torch_adaln(x, shift, scale):
    return F.layer_norm(x, x.shape[-1:], eps=EPS) * (1 + scale[:, None]) + shift[:, None]


def _torch_residual_adaln(x, y, gate, shift, scale):
    x_new = x + gate[:, None] * y
    return x_new, _torch_adaln(x_new, shift, scale)


def _fn(op, provider, x, y, mod):
    """The call: (x, y, mod) -> a tuple of outputs, gate, shift, scale sliced from mod as in Block."""
    backend = ENAT.get(provider)

    def call():
        gate, shift, scale = (mod[:, i * D:(i + 1) * D] for i in (4, 5, 6))
        if op == "adaln":
            out = _torch_adaln(x, shift, scale) if provider == BASELINE else K.adaln(x, shift, scale, backend=backend)
            return (out,)
        if provider == BASELINE:
            return _torch_residual_adaln(x, y, gate, shift, scale)
        return K.residual_adaln(x, y, gate, shift, scale, backend=backend)

    return call


def _params():
    params = []
    for role, B, L, dtype, modes in CASES:
        for mode in modes:
            params.append(pytest.param(role, B, L, dtype, mode, id=f"{role}-B{B}-L{L}-d{D}-{mode}"))
    return params


@pytest.mark.parametrize(("role", "B", "L", "dtype", "mode"), _params())
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("op", ["adaln", "residual_adaln"])
def bench_adaln(benchmark, op, provider, role, B, L, dtype, mode):
    train = mode == "fwd+bwd"
    x = torch.randn(B, L, D, device=DEVICE).to(dtype).requires_grad_(train)
    y = torch.randn(B, L, D, device=DEVICE).to(dtype).requires_grad_(train)
    mod = (0.1 * torch.randn(B, 8 * D, device=DEVICE)).to(dtype).requires_grad_(train)
    call = _fn(op, provider, x, y, mod)
    esize = x.element_size()
    elements = ELEMENTS[(op, "fwd")] + (ELEMENTS[(op, "bwd")] if train else 0)
    bytes_moved = (elements * B * L * D + ROW_TENSORS[op] * B * D * (2 if train else 1)) * esize
    if train:
        inputs = (x, y, mod) if op == "residual_adaln" else (x, mod)
        grads = [torch.randn(B, L, D, device=DEVICE).to(dtype) for _ in range(1 if op == "adaln" else 2)]

        def fn():
            return torch.autograd.grad(call(), inputs, grads)
    else:
        fn = call
    measure(benchmark, fn, op=op, provider=provider, mode=mode, shape=f"B{B} L{L} d{D}", dtype=dtype,
            bytes_moved=bytes_moved, baselines=(BASELINE,), layout="model views", role=role)

"""asymmetric_attention against the ways PyTorch code does the same thing.

Shapes follow ENAT-L (B=128, H=16, D=64) at L=256 and L=1024: Lq [MASK] queries over Lc visible
keys plus the Lq [MASK] keys themselves (Ls = Lq, so Lc + Ls = L), with Lq/Lc splits from the
sampling schedule (251/5, 128/128, 49/207 at L=256, scaled at L=1024). Small shapes on CPU.
"""

import pytest
import torch
import torch.nn.functional as F

import enat_kernels.ops as K
from enat.paper_style import PaperStyleOps
from harness import DEVICE, ON_GPU, measure

if ON_GPU:
    B, H, D = 128, 16, 64
    SPLITS = [(251, 5), (128, 128), (49, 207), (1004, 20), (512, 512), (196, 828)]
    DTYPES = [torch.float16, torch.bfloat16]
else:
    B, H, D = 2, 4, 64
    SPLITS = [(60, 4), (32, 32), (12, 52)]
    DTYPES = [torch.float32]

BASELINE = "cat+sdpa"
BASELINES = (BASELINE, "sdpa (concatenated)", "naive (paper)")


def _cat_sdpa(q, k_ctx, v_ctx, k_self, v_self):
    return F.scaled_dot_product_attention(q, torch.cat([k_ctx, k_self], 2), torch.cat([v_ctx, v_self], 2))


PROVIDERS = {
    "enat-cuda": lambda *a: K.asymmetric_attention(*a, backend="cuda"),
    "enat-triton": lambda *a: K.asymmetric_attention(*a, backend="triton"),
    "enat-reference": lambda *a: K.asymmetric_attention(*a, backend="reference"),
    BASELINE: _cat_sdpa,
    "sdpa (concatenated)": None,  # K/V concatenated before timing: the floor for any two-segment kernel
    "naive (paper)": PaperStyleOps.attention,  # concatenate, then matmul, softmax, matmul
}
if ON_GPU:  # the fp32 reference materialises fp32 scores: tens of GB at these shapes, and no contender
    del PROVIDERS["enat-reference"]


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("split", SPLITS, ids=lambda s: f"Lq{s[0]}-Lc{s[1]}")
def bench_asymmetric_attention(benchmark, provider, mode, dtype, split):
    Lq, Lc = split
    backward = mode == "fwd+bwd"

    def make(n):
        return torch.randn(B, H, n, D, device=DEVICE, dtype=dtype, requires_grad=backward)

    q, k_ctx, v_ctx, k_self, v_self = make(Lq), make(Lc), make(Lc), make(Lq), make(Lq)
    if provider == "sdpa (concatenated)":
        k = torch.cat([k_ctx, k_self], 2).detach().requires_grad_(backward)
        v = torch.cat([v_ctx, v_self], 2).detach().requires_grad_(backward)

        def attend():
            return F.scaled_dot_product_attention(q, k, v)
    else:

        def attend():
            return PROVIDERS[provider](q, k_ctx, v_ctx, k_self, v_self)

    grad = torch.randn(B, H, Lq, D, device=DEVICE, dtype=dtype)
    fn = (lambda: attend().backward(grad)) if backward else attend
    flops = 4 * B * H * Lq * (Lc + Lq) * D * (3.5 if backward else 1.0)  # backward: 5 matmuls to 2
    with torch.set_grad_enabled(backward):
        measure(benchmark, fn, op="asymmetric_attention", provider=provider, mode=mode,
                shape=f"B{B} H{H} D{D} Lq{Lq} Lc{Lc} Ls{Lq}", dtype=dtype, flops=flops, baselines=BASELINES)

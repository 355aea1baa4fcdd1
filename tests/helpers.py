"""Shared test helpers: where each backend runs, awkward inputs, the error budget."""

import pytest
import torch

from enat import ENATConfig
from enat_kernels import triton_utils

HAS_GPU = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU; this machine has none (CPU paths run here)")
needs_triton = pytest.mark.skipif(triton_utils.triton is None, reason="triton is not installed")


def triton_device():
    """Where Triton kernels run in this session: CPU tensors under the interpreter, else the GPU."""
    return "cpu" if triton_utils.INTERPRET else "cuda"


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


def max_error(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


# Rounding floor of the error budget, in ulps of the output dtype at the scale of the summed terms
# (oracle.attention_error_scales). A correct kernel rounds each term a handful of times (products,
# exp2, the fp32 accumulations), each worth half an ulp of that scale; how the roundings fall differs
# between CPUs, BLAS builds and GPUs, so the same-dtype PyTorch error alone can be a lucky 0.3 ulp
# while an equally correct kernel lands at several. A wrong kernel misses by a sizeable fraction of
# the scale, thousands of ulps.
FLOOR_ULPS = 4


def assert_within_budget(out, oracle, torch_same_dtype, factor, what="", scale=None):
    """The FlashAttention rule: a kernel's error against the fp64 oracle is at most `factor` times
    the error of the same-dtype PyTorch computation, plus FLOOR_ULPS ulps of the output dtype at
    `scale` (the magnitude of the terms the result sums; by default the largest |oracle| entry)."""
    if out.numel() == 0:
        return
    err = max_error(out, oracle)
    base = max_error(torch_same_dtype, oracle)
    if scale is None:
        scale = oracle.double().abs().max().item()
    floor = FLOOR_ULPS * torch.finfo(out.dtype).eps * scale
    assert err <= factor * base + floor, (
        f"{what}: error {err:.3e} > {factor} x {base:.3e} (torch) + {floor:.3e} ({FLOOR_ULPS} ulps at scale {scale:.3g})"
    )


# Model helpers.

TINY = ENATConfig("tiny", depth_enc=2, depth_dec=2, width=48, heads=3, resolution=80)  # L = 25, head dim 16
SMALL_S = ENATConfig("ENAT-S-64px", depth_enc=15, depth_dec=1, width=366, heads=6, resolution=64)  # head dim 61


def oracle_cfg(cfg):
    """The config dict enat_oracle takes."""
    return dict(depth_enc=cfg.depth_enc, depth_dec=cfg.depth_dec, width=cfg.width, heads=cfg.heads)


def perturbed(model_class, cfg, dtype=torch.float64, seed=0):
    """A model whose every parameter is random: LayerNorm weights near 1, the rest ~ N(0, 1/fan_in)."""
    model = model_class(cfg).to(dtype).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float64)
            if p.dim() == 1 and name.endswith("weight"):  # LayerNorm scales
                p.copy_(1 + 0.2 * noise)
            elif p.dim() == 1 or name == "mlm_layer.bias":
                p.copy_(0.2 * noise)
            else:
                p.copy_(noise / p.shape[-1] ** 0.5)
    return model


INTERPRETED_BF16 = "the Triton interpreter computes bf16 wrongly (a known interpreter limit); bf16 runs on a GPU"


def replaced(inputs, changes):
    """(inputs, kwargs) for a bad-input case: each change to a name in `inputs` (a dict of valid tensors)
    replaces it (a callable is applied to the valid tensor), any other change is an extra keyword."""
    kwargs = {}
    for k, v in changes.items():
        if k in inputs:
            inputs[k] = v(inputs[k]) if callable(v) else v
        else:
            kwargs[k] = v
    return inputs, kwargs


def backend_params(backends, dtypes, devices):
    """pytest params of (backend, dtype) for the named dtypes {id: dtype}, marked to skip where the
    platform cannot run them; `devices` maps each backend to the device its tensors live on."""
    params = []
    for backend in backends:
        for name, dtype in dtypes.items():
            marks = []
            if devices[backend] == "cuda":
                marks.append(needs_gpu)
            if backend == "triton":
                marks.append(needs_triton)
                if devices[backend] == "cpu" and dtype == torch.bfloat16:
                    marks.append(pytest.mark.skip(reason=INTERPRETED_BF16))
            params.append(pytest.param(backend, dtype, marks=marks, id=f"{backend or 'auto'}-{name}"))
    return params

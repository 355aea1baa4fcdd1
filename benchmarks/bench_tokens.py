"""Critical-token movement against boolean-mask indexing (what the paper's code does), torch.gather /
scatter, and a plain device copy of the same bytes (the bandwidth ceiling).

Shapes: (B=128, L=256, D=1024) and (B=32, L=1024, D=1024) on a GPU, n = L/2 rows moved; small on CPU.
"""

import pytest
import torch

import enat_kernels.ops as K
from enat.paper_style import PaperStyleOps as P
from harness import DEVICE, ON_GPU, measure

if ON_GPU:
    SHAPES = [(128, 256, 1024), (32, 1024, 1024)]
    DTYPES = [torch.float16, torch.bfloat16]
else:
    SHAPES = [(4, 256, 256)]
    DTYPES = [torch.float32]

BASELINE = "bool-mask (paper)"
ENAT = {f"enat-{b}": b for b in ("cuda", "triton", "reference")}


def _setup(shape, dtype):
    B, L, D = shape
    n = L // 2
    mask = torch.rand(B, L, device=DEVICE).argsort(dim=1) < n  # n True entries per row, at random
    x = torch.randn(B, L, D, device=DEVICE).to(dtype)
    return B, L, D, n, mask, x


def _copy(src):
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


def _cases(op, B, L, D, n, mask, x):
    """{provider: fn} and the bytes one call must move at least."""
    esize = x.element_size()
    idx = K.mask_to_index(mask, n)
    vis_idx = K.mask_to_index(~mask, L - n)
    packed = x[:, :n].contiguous()
    if op == "gather_tokens":
        cases = {p: (lambda b=b: K.gather_tokens(x, idx, backend=b)) for p, b in ENAT.items()}
        cases["torch.gather"] = lambda: torch.gather(x, 1, idx[..., None].expand(-1, -1, D))
        cases[BASELINE] = lambda: P.gather(x, mask)
        cases["copy"] = _copy(packed)
        return cases, 2 * B * n * D * esize + idx.numel() * 8
    if op == "scatter_tokens":
        cases = {p: (lambda b=b: K.scatter_tokens(x, idx, packed, backend=b)) for p, b in ENAT.items()}
        cases["torch.scatter"] = lambda: x.scatter(1, idx[..., None].expand(-1, -1, D), packed)
        cases[BASELINE] = lambda: x.masked_scatter(mask[..., None], packed)
        cases["copy"] = _copy(x)
        return cases, 2 * B * L * D * esize
    if op == "split_tokens":
        cases = {p: (lambda b=b: K.split_tokens(x, mask, n, backend=b)) for p, b in ENAT.items()}
        cases[BASELINE] = lambda: P.split(x, mask)
        cases["copy"] = _copy(x)
        return cases, 2 * B * L * D * esize
    if op == "restore_tokens":
        visible, masked = K.split_tokens(x, mask, n)
        cases = {p: (lambda b=b: K.restore_tokens(visible, masked, mask, backend=b)) for p, b in ENAT.items()}
        cases[BASELINE] = lambda: P.restore(visible, masked, mask)
        cases["copy"] = _copy(x)
        return cases, 2 * B * L * D * esize
    if op == "merge_cache":
        fresh, cached = K.split_tokens(x, mask, n)
        cases = {p: (lambda b=b: K.merge_cache(fresh, idx, cached, vis_idx, backend=b)) for p, b in ENAT.items()}
        cases[BASELINE] = lambda: P.merge(fresh, mask, cached, ~mask)
        cases["copy"] = _copy(x)
        return cases, 2 * B * L * D * esize
    if op == "mask_to_index":
        cases = {p: (lambda b=b: K.mask_to_index(mask, n, backend=b)) for p, b in ENAT.items()}
        cases[BASELINE] = lambda: mask.nonzero()[:, 1].view(B, n)
        return cases, B * L + B * n * 8
    raise ValueError(op)


COMMON = [*ENAT, BASELINE]
OP_PROVIDERS = {
    "gather_tokens": [*COMMON, "torch.gather", "copy"],
    "scatter_tokens": [*COMMON, "torch.scatter", "copy"],
    "split_tokens": [*COMMON, "copy"],
    "restore_tokens": [*COMMON, "copy"],
    "merge_cache": [*COMMON, "copy"],
    "mask_to_index": COMMON,
}


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-L{}-D{}".format(*s))
@pytest.mark.parametrize(("op", "provider"), [(op, p) for op, ps in OP_PROVIDERS.items() for p in ps])
def bench_tokens(benchmark, op, provider, shape, dtype):
    B, L, D, n, mask, x = _setup(shape, dtype)
    cases, bytes_moved = _cases(op, B, L, D, n, mask, x)
    measure(benchmark, cases[provider], op=op, provider=provider, mode="fwd", shape=f"B{B} L{L} D{D} n{n}",
            dtype=dtype, bytes_moved=bytes_moved, baselines=(BASELINE,))

"""Critical-token movement against boolean-mask indexing (what the paper's code does), the torch index
way (torch.gather / torch.scatter / torch.argsort), and a plain device copy (the bandwidth ceiling).

Shapes (GPU): B=256 rows (128 images with guidance), D=1024 (ENAT-L's width), L=256 and L=1024 tokens,
n = the [MASK] count n_k of an 8-step generation (enat.schedule.mask_schedule): the GPU check runs the
mid-trajectory count (k=4: n=181 at L=256, 724 at L=1024), `make bench` every step's. Every working
set is above the L2 cache and do_bench flushes L2 before each call anyway, so the copy provider (the
same number of bytes through torch's copy kernel) is the device's copy bandwidth. One dtype (fp16):
the ops move bytes, whatever they hold. Tiny shape (B1 L16 D64 n8): the host path, eager latency.
On a CPU: B=2, L=64, D=64, the mid-trajectory count only.

Bytes per op (what it must read and write): gather n rows, read + write, plus the index; scatter,
split, restore and merge_cache a whole (B, L, D) tensor read + written; mask_to_index the mask and
the index. GB/s = bytes / GPU time.
"""

import pytest
import torch

import enat_kernels.ops as K
from enat.paper_style import PaperStyleOps as P
from enat.schedule import mask_schedule
from harness import DEVICE, ON_GPU, extended, measure

STEPS = 8
CHECK_STEP = 4
if ON_GPU:
    B, D, SEQ_LENS, DTYPE = 256, 1024, (256, 1024), torch.float16
else:
    B, D, SEQ_LENS, DTYPE = 2, 64, (64,), torch.float32
TINY = (1, 16, 64, 8)  # B, L, D, n

BASELINE = "bool-mask (paper)"
ENAT = {"enat-auto": None, **{f"enat-{b}": b for b in ("cuda", "triton", "reference")}}


def _shapes():
    params = []
    for L in SEQ_LENS:
        counts = mask_schedule(L, STEPS)
        for k in range(1, STEPS) if ON_GPU else [CHECK_STEP]:
            params.append(pytest.param((B, L, D, counts[k]), marks=() if k == CHECK_STEP else extended,
                                       id=f"B{B}-L{L}-D{D}-n{counts[k]}-k{k}"))
    return params


def _setup(shape, dtype):
    B, L, D, n = shape
    mask = torch.rand(B, L, device=DEVICE).argsort(dim=1) < n  # n True entries per row, at random
    x = torch.randn(B, L, D, device=DEVICE).to(dtype)
    return B, L, D, n, mask, x


def _copy(src):
    dst = torch.empty_like(src)
    return (lambda: dst.copy_(src)), 2 * src.numel() * src.element_size()


def _expand(index, D):
    return index[..., None].expand(-1, -1, D)


def _cases(op, B, L, D, n, mask, x):
    """{provider: fn}, the bytes one call of the op must move, and {provider: bytes} where different."""
    esize = x.element_size()
    idx = K.mask_to_index(mask, n)
    vis_idx = K.mask_to_index(~mask, L - n)
    order = torch.cat([vis_idx, idx], 1)  # visible positions, then masked ones: the torch way's index
    packed = x[:, :n].contiguous()
    whole = 2 * B * L * D * esize
    if op == "gather_tokens":
        cases = {p: (lambda b=b: K.gather_tokens(x, idx, backend=b)) for p, b in ENAT.items()}
        cases["torch.gather"] = lambda: torch.gather(x, 1, _expand(idx, D))
        cases[BASELINE] = lambda: P.gather(x, mask)
        cases["copy"], copy_bytes = _copy(packed)
        return cases, 2 * B * n * D * esize + idx.numel() * 8, copy_bytes
    if op == "scatter_tokens":
        cases = {p: (lambda b=b: K.scatter_tokens(x, idx, packed, backend=b)) for p, b in ENAT.items()}
        cases["torch.scatter"] = lambda: x.scatter(1, _expand(idx, D), packed)
        cases[BASELINE] = lambda: x.masked_scatter(mask[..., None], packed)
        cases["copy"], copy_bytes = _copy(x)
        return cases, whole, copy_bytes
    if op == "split_tokens":
        cases = {p: (lambda b=b: K.split_tokens(x, mask, n, backend=b)) for p, b in ENAT.items()}

        def torch_split():  # the index from the mask, one gather, two views
            rows = torch.gather(x, 1, _expand(torch.argsort(mask.to(torch.int8), dim=1, stable=True), D))
            return rows[:, : L - n], rows[:, L - n:]
        cases["torch.gather"] = torch_split
        cases[BASELINE] = lambda: P.split(x, mask)
        cases["copy"], copy_bytes = _copy(x)
        return cases, whole, copy_bytes
    if op == "restore_tokens":
        visible, masked = K.split_tokens(x, mask, n)

        def torch_restore():
            at = torch.argsort(mask.to(torch.int8), dim=1, stable=True)
            out = torch.empty_like(x)
            out.scatter_(1, _expand(at[:, : L - n], D), visible)
            return out.scatter_(1, _expand(at[:, L - n:], D), masked)
        cases = {p: (lambda b=b: K.restore_tokens(visible, masked, mask, backend=b)) for p, b in ENAT.items()}
        cases["torch.scatter"] = torch_restore
        cases[BASELINE] = lambda: P.restore(visible, masked, mask)
        cases["copy"], copy_bytes = _copy(x)
        return cases, whole, copy_bytes
    if op == "merge_cache":
        cached, fresh = K.split_tokens(x, mask, n)  # fresh: the n rows at idx; cached: the others

        def torch_merge():  # rank of each row in the union of positions, one gather
            rank = torch.argsort(torch.cat([idx, vis_idx], 1), dim=1)
            return torch.gather(torch.cat([fresh, cached], 1), 1, _expand(rank, D))
        cases = {p: (lambda b=b: K.merge_cache(fresh, idx, cached, vis_idx, backend=b)) for p, b in ENAT.items()}
        cases["torch.gather"] = torch_merge
        cases[BASELINE] = lambda: P.merge(fresh, mask, cached, ~mask)
        cases["copy"], copy_bytes = _copy(x)
        return cases, whole, copy_bytes
    if op == "mask_to_index":
        cases = {p: (lambda b=b: K.mask_to_index(mask, n, backend=b)) for p, b in ENAT.items()}
        cases["torch.argsort"] = lambda: torch.argsort(~mask, dim=1, stable=True)[:, :n]
        cases[BASELINE] = lambda: mask.nonzero()[:, 1].view(B, n)
        return cases, B * L + B * n * 8, None
    raise ValueError(op)


COMMON = [*ENAT, BASELINE]
OP_PROVIDERS = {
    "gather_tokens": [*COMMON, "torch.gather", "copy"],
    "scatter_tokens": [*COMMON, "torch.scatter", "copy"],
    "split_tokens": [*COMMON, "torch.gather", "copy"],
    "restore_tokens": [*COMMON, "torch.scatter", "copy"],
    "merge_cache": [*COMMON, "torch.gather", "copy"],
    "mask_to_index": [*COMMON, "torch.argsort"],
}
CASES = [(op, p) for op, ps in OP_PROVIDERS.items() for p in ps]


def _run(benchmark, op, provider, shape, dtype, role):
    B, L, D, n, mask, x = _setup(shape, dtype)
    cases, bytes_moved, copy_bytes = _cases(op, B, L, D, n, mask, x)
    measure(benchmark, cases[provider], op=op, provider=provider, mode="fwd", shape=f"B{B} L{L} D{D} n{n}",
            dtype=dtype, role=role, bytes_moved=copy_bytes if provider == "copy" else bytes_moved,
            baselines=(BASELINE, "torch.gather", "torch.scatter", "torch.argsort"))


@pytest.mark.parametrize("shape", _shapes())
@pytest.mark.parametrize(("op", "provider"), CASES)
def bench_tokens(benchmark, op, provider, shape):
    _run(benchmark, op, provider, shape, DTYPE, "trajectory")


@pytest.mark.parametrize(("op", "provider"), [c for c in CASES if c[1] not in ("copy", "enat-reference")])
def bench_tokens_tiny(benchmark, op, provider):
    """The host path: at B1 L16 D64 n8 eager latency is launch and dispatch overhead."""
    _run(benchmark, op, provider, TINY, DTYPE, "tiny")


"""Image generation with enat.sample: images/s, TFLOP/s, share of the GPU's bf16 matmul ceiling and
peak memory, for this package's engine against the plain-PyTorch baseline a user would write instead
and against the paper code's way of running the same weights.

Providers (8 steps, the paper's sampler settings for the resolution, the same weights):
- enat: enat.sample on the engine (fused adaLN ops, fused projection, asymmetric attention and token
  kernels), bf16 weights on a GPU; enat-graph: the same replayed as one CUDA graph (GraphedSampler).
- torch: enat.torch_baseline (SDPA over torch.cat, F.layer_norm, torch.gather at argsort positions,
  batched guidance), bf16 weights; torch-graph: the same captured as a CUDA graph.
- paper-style: enat.paper_style (naive attention over concatenated K/V, boolean indexing, two CFG
  passes) under fp16 autocast on fp32 weights, as the paper's code runs.
- enat-no-reuse and plain-nat (the ablations; `extended`, so `make bench` only on a GPU).
- enat+pixels and enat-graph+pixels (bench_sample_pixels): the engine followed by the VQGAN decoder
  (enat.vq, bf16, channels_last), images/s from class labels to pixels.
bench_sample_host times the host path of eager generation: `enat` against `torch` on a model with
ENAT-L's depth (22 + 2 blocks) at a tiny width (32, 2 heads, 16 tokens), where the time is almost all
Python and dispatch: batch 1 on one CPU thread; on a GPU batch 1, 8 and 32 (targets: at most 1.0x the
baseline's time on the CPU, 1.1x on the GPU at batch 1, ahead of it from batch 8).
Sizes on a GPU: ENAT-S/B/L at 256 px with batch 32 and 128, ENAT-L at 512 px with batch 16 (the other
512 px cases `extended`). On a CPU in fp32 at batch 2, ENAT-S and ENAT-B at 256 px (a smoke run with
--benchmark-disable generates once per provider with ENAT-S only). bench_matmul_ceiling measures the
bf16 matmul TFLOP/s in the same run; bench_bf16_agreement reports how many of the bf16 engine's
tokens equal those of the fp32 model (same generator). summarize.py prints the headline table and the
targets (ENAT-L 256 px: batch 128 at >= 50% of the ceiling and >= 1.8x torch, batch 32 >= 2x torch
without graphs; ENAT-L 512 px batch 16 >= 1.8x torch).
"""

import contextlib

import pytest
import torch

import enat
import enat.paper_style
import enat.torch_baseline
import enat.vq
from harness import DEVICE, ON_GPU, extended, gpu_time, measure

STEPS = 8
if ON_GPU:
    CASES = [(name, 256, batch) for name in ("ENAT-S", "ENAT-B", "ENAT-L") for batch in (32, 128)]
    CASES += [("ENAT-L", 512, 16)] + [pytest.param(name, 512, 16, marks=extended) for name in ("ENAT-S", "ENAT-B")]
    ROUNDS, DTYPE = 5, torch.bfloat16
else:
    CASES = [("ENAT-S", 256, 2), ("ENAT-B", 256, 2)]
    ROUNDS, DTYPE = 2, torch.float32
SMOKE = ("ENAT-S", 256)  # the one size a CPU smoke run (--benchmark-disable) generates with
GRAPHS = ("enat-graph", "torch-graph")
PROVIDERS = ["enat", "enat-graph", "torch", "torch-graph", "paper-style",
             pytest.param("enat-no-reuse", marks=extended), pytest.param("plain-nat", marks=extended)]
BASELINES = ("torch", "paper-style")

_models = {}


def _model(kind, cfg, dtype):
    """One set of models per config, kept for the session; every kind and dtype holds the same weights."""
    key = (kind, cfg, dtype)
    if key not in _models:
        if not any(k[1] == cfg for k in _models):
            _models.clear()  # one configuration at a time: ENAT-L at 512 px is 2.3 GB in fp32
        torch.manual_seed(0)
        model = (enat.PlainNAT if kind == "plain" else enat.ENAT)(cfg)
        _models[key] = model.to(DEVICE, dtype).eval()
    return _models[key]


def _generator():
    return torch.Generator(DEVICE).manual_seed(0)


def _generate_fn(provider, model, labels, settings):
    """A no-argument function generating one batch with `provider` (graph providers capture first)."""
    if provider in GRAPHS:
        context = enat.torch_baseline.torch_ops(model) if provider == "torch-graph" else contextlib.nullcontext()
        with context:
            sampler = enat.GraphedSampler(model, labels.shape[0], **settings)
        return lambda: sampler(labels, seed=0)
    if provider == "paper-style":
        return lambda: enat.paper_style.sample(model, labels, generator=_generator(), **settings)
    if provider == "torch":
        return lambda: enat.torch_baseline.sample(model, labels, generator=_generator(), **settings)
    reuse = provider != "enat-no-reuse"
    return lambda: enat.sample(model, labels, reuse=reuse, generator=_generator(), **settings)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize(("name", "resolution", "batch"), CASES, ids=lambda v: str(v))
def bench_sample(benchmark, name, resolution, batch, provider):
    if benchmark.disabled and not ON_GPU and (name, resolution) != SMOKE:
        pytest.skip(f"smoke run on a CPU (--benchmark-disable): only {SMOKE[0]} at {SMOKE[1]} px generates; "
                    f"--benchmark-only times {name} at {resolution} px")
    if provider in GRAPHS and not ON_GPU:
        pytest.skip("CUDA graphs need a GPU")
    cfg = enat.config(name, resolution)
    labels = torch.arange(batch, device=DEVICE) * 37 % 1000
    settings = dict(steps=STEPS, cfg_scale=cfg.cfg_scale, mask_temp=cfg.mask_temp, samp_temp=cfg.samp_temp)
    weights = torch.float32 if provider == "paper-style" else DTYPE
    model = _model("plain" if provider == "plain-nat" else "enat", cfg, weights)
    generate = _generate_fn(provider, model, labels, settings)
    macs = enat.flops.generation_macs(cfg, steps=STEPS, reuse=provider != "enat-no-reuse",
                                      plain=provider == "plain-nat")
    measure(benchmark, generate, op=f"sample {name} {resolution}px", provider=provider, mode="generate",
            shape=f"B{batch} T{STEPS}", dtype=DTYPE, flops=2 * macs * batch, images=batch, baselines=BASELINES,
            rounds=ROUNDS)
    info = benchmark.extra_info
    info["GMACs/image"] = macs / 1e9
    info["precision"] = ("fp16 autocast, fp32 weights" if provider == "paper-style" and ON_GPU
                         else f"{str(weights).removeprefix('torch.')} weights")
    if ON_GPU and not benchmark.disabled:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        generate()
        torch.cuda.synchronize()
        info["peak_GB"] = torch.cuda.max_memory_allocated() / 2**30


HOST_CONFIG = enat.ENATConfig("ENAT-L depth, width 32", depth_enc=22, depth_dec=2, width=32, heads=2, resolution=64)
HOST_BATCHES = (1, 8, 32) if ON_GPU else (1,)


@pytest.fixture
def one_thread():
    """The host-path benchmark runs on one CPU thread (restored afterwards)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("provider", ["enat", "torch"])
@pytest.mark.parametrize("batch", HOST_BATCHES)
def bench_sample_host(benchmark, one_thread, batch, provider):
    """Eager generation where host cost dominates (HOST_CONFIG): the engine against plain PyTorch."""
    labels = torch.arange(batch, device=DEVICE) * 37 % 1000
    settings = dict(steps=STEPS, cfg_scale=HOST_CONFIG.cfg_scale, mask_temp=HOST_CONFIG.mask_temp,
                    samp_temp=HOST_CONFIG.samp_temp)
    generate = _generate_fn(provider, _model("enat", HOST_CONFIG, DTYPE), labels, settings)
    measure(benchmark, generate, op="eager sampling (host-bound)", provider=provider, mode="generate",
            shape=f"B{batch} T{STEPS}", dtype=DTYPE, images=batch, role="host", rounds=None if ON_GPU else 20)
    benchmark.extra_info["threads"] = torch.get_num_threads()


_vqgans = {}


def _vqgan():
    """The paper's VQGAN decoder (random weights: the same cost) in the engine's dtype; on a CPU the
    tiny configuration, so that the smoke run stays short."""
    if not _vqgans:
        config = {} if ON_GPU else enat.vq.TINY_CONFIG
        _vqgans["vq"] = enat.vq.VQGAN(**config).eval().to(DEVICE, DTYPE)
    return _vqgans["vq"]


@pytest.mark.parametrize("provider", ["enat", "enat-graph"])
@pytest.mark.parametrize(("name", "resolution", "batch"), CASES, ids=lambda v: str(v))
def bench_sample_pixels(benchmark, name, resolution, batch, provider):
    """Class labels to pixels: the generation above followed by the VQGAN decoder ("enat+pixels")."""
    if not ON_GPU and (name, resolution) != SMOKE:
        pytest.skip(f"on a CPU only {SMOKE[0]} at {SMOKE[1]} px decodes (with the tiny VQGAN)")
    if provider in GRAPHS and not ON_GPU:
        pytest.skip("CUDA graphs need a GPU")
    cfg = enat.config(name, resolution)
    labels = torch.arange(batch, device=DEVICE) * 37 % 1000
    settings = dict(steps=STEPS, cfg_scale=cfg.cfg_scale, mask_temp=cfg.mask_temp, samp_temp=cfg.samp_temp)
    generate = _generate_fn(provider, _model("enat", cfg, DTYPE), labels, settings)
    vqgan = _vqgan()

    def pixels():
        with torch.no_grad():
            return vqgan.decode(generate())

    macs = enat.flops.generation_macs(cfg, steps=STEPS, vq_decoder=ON_GPU)
    measure(benchmark, pixels, op=f"sample {name} {resolution}px", provider=f"{provider}+pixels", mode="generate",
            shape=f"B{batch} T{STEPS}", dtype=DTYPE, flops=2 * macs * batch, images=batch, rounds=ROUNDS)


def bench_matmul_ceiling(benchmark):
    """The bf16 matmul TFLOP/s this GPU reaches (8192^3, cuBLAS): the ceiling generation shares are
    quoted against."""
    if not ON_GPU:
        pytest.skip("the matmul ceiling is a GPU figure")
    n = 8192
    a, b = (torch.randn(n, n, device=DEVICE, dtype=torch.bfloat16) for _ in range(2))
    measure(benchmark, lambda: a @ b, op="matmul ceiling", provider="torch.mm", mode="fwd", shape=f"{n}^3",
            dtype=torch.bfloat16, flops=2 * n**3)


def bench_bf16_agreement(benchmark):
    """Share of ENAT-L's tokens (256 px, batch 32, same generator) that the bf16 engine samples as the
    fp32 model does: recorded, not timed."""
    if not ON_GPU:
        pytest.skip("bf16 against fp32 on a GPU")
    cfg = enat.config("ENAT-L", 256)
    labels = torch.arange(32, device=DEVICE) * 37 % 1000
    torch.manual_seed(0)
    model = enat.ENAT(cfg).to(DEVICE).eval()
    reference = enat.sample(model, labels, generator=_generator())
    fast = enat.sample(model.to(torch.bfloat16), labels, generator=_generator())
    agreement = (fast == reference).double().mean().item()
    benchmark.extra_info.update(op="bf16 agreement", provider="enat", mode="generate", shape="ENAT-L 256px B32",
                                dtype="bfloat16", agreement=agreement)
    benchmark(lambda: None)

"""Image generation with enat.sample: images/s and GMACs/image for ENAT (with and without feature reuse),
the plain NAT, and the paper code's way of running the same ENAT weights ("paper-style": attention over
concatenated K/V, boolean indexing, two CFG passes; fp16 autocast on a GPU), and on a GPU ENAT with
reuse replayed as one CUDA graph (enat.GraphedSampler, "enat-reuse-graph").

8 steps with the paper's sampler settings for the resolution. On a GPU every provider runs under fp16
autocast, at batch 32 and 128; on a CPU in fp32 at batch 2, and only where one image takes seconds,
not minutes (ENAT-B and ENAT-L at 512 px are GPU-only); a CPU smoke run (--benchmark-disable) generates
once per provider with ENAT-S at 256 px only.
"""

import pytest
import torch

import enat
import enat.paper_style
from harness import DEVICE, ON_GPU, measure

STEPS = 8
SIZES = [(name, res) for res in (256, 512) for name in ("ENAT-S", "ENAT-B", "ENAT-L")]
if ON_GPU:
    BATCHES, ROUNDS = [32, 128], 5
    CPU_SKIP = ()
else:
    BATCHES, ROUNDS = [2], 2
    CPU_SKIP = (("ENAT-B", 512), ("ENAT-L", 512))
SMOKE = ("ENAT-S", 256)  # the one size a CPU smoke run (--benchmark-disable) generates with
BASELINE = "paper-style"
GRAPHED = "enat-reuse-graph"
PROVIDERS = ["enat-reuse", GRAPHED, "enat-no-reuse", "plain-nat", BASELINE]

_models = {}


def _model(kind, cfg):
    """One model per (kind, config), kept for the session; ENAT weights are shared with paper-style."""
    key = (kind, cfg)
    if key not in _models:
        _models.clear()  # one configuration's models at a time: ENAT-L at 512 px is 2 x 2.3 GB in fp32
        torch.manual_seed(0)
        _models[key] = (enat.PlainNAT if kind == "plain" else enat.ENAT)(cfg).to(DEVICE).eval()
    return _models[key]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("batch", BATCHES, ids=lambda b: f"B{b}")
@pytest.mark.parametrize(("name", "resolution"), SIZES, ids=lambda v: str(v))
def bench_sample(benchmark, name, resolution, batch, provider):
    if (name, resolution) in CPU_SKIP:
        pytest.skip(f"{name} at {resolution} px takes minutes per image on a CPU; it is measured on a GPU")
    if benchmark.disabled and not ON_GPU and (name, resolution) != SMOKE:
        pytest.skip(f"smoke run on a CPU (--benchmark-disable): one generation takes 10 s to minutes here, so "
                    f"only {SMOKE[0]} at {SMOKE[1]} px runs; --benchmark-only times {name} at {resolution} px")
    if provider == GRAPHED and not ON_GPU:
        pytest.skip("CUDA graphs need a GPU")
    cfg = enat.config(name, resolution)
    labels = torch.arange(batch, device=DEVICE) * 37 % 1000
    settings = dict(steps=STEPS, cfg_scale=cfg.cfg_scale, mask_temp=cfg.mask_temp, samp_temp=cfg.samp_temp)
    model = _model("plain" if provider == "plain-nat" else "enat", cfg)
    run = enat.paper_style.sample if provider == BASELINE else enat.sample
    graphed = []

    def generate():
        if provider == GRAPHED:  # the first call (not timed) warms up and captures
            if not graphed:
                graphed.append(enat.GraphedSampler(model, batch, autocast=torch.float16, **settings))
            return graphed[0](labels, seed=0)
        generator = torch.Generator(DEVICE).manual_seed(0)
        with torch.autocast("cuda", torch.float16, enabled=ON_GPU):
            return run(model, labels, reuse=provider != "enat-no-reuse", generator=generator, **settings)

    macs = enat.flops.generation_macs(cfg, steps=STEPS, reuse=provider != "enat-no-reuse",
                                      plain=provider == "plain-nat")
    measure(benchmark, generate, op=f"sample {name} {resolution}px", provider=provider, mode="generate",
            shape=f"B{batch} T{STEPS}", dtype=torch.float16 if ON_GPU else torch.float32,
            flops=2 * macs * batch, images=batch, baselines=(BASELINE,), rounds=ROUNDS)
    benchmark.extra_info["GMACs/image"] = macs / 1e9

"""Where one image-generation run spends its time: images/s, host time against device time, and the
top device kernels, for one model, batch and way of running it.

    python benchmarks/profile_sample.py ENAT-L --batch-size 128
    python benchmarks/profile_sample.py ENAT-L --batch-size 128 --provider torch
    python benchmarks/profile_sample.py ENAT-S --batch-size 32 --provider paper-style --weights autocast

Providers as in bench_model.py (eager). --weights: "bf16" (default) and "fp16" convert the weights
(no autocast); "autocast" keeps fp32 weights under fp16 autocast (as the paper's code runs). When host time is close to the wall time and the
device is idle between kernels, the run is bound by launches, not by the GPU.
"""

import argparse
import contextlib
import time

import torch

import enat
import enat.paper_style
import enat.torch_baseline
from enat.cli import add_old_spelling

RUNS = {"enat": enat.sample, "enat-no-reuse": enat.sample, "plain-nat": enat.sample,
        "torch": enat.torch_baseline.sample, "paper-style": enat.paper_style.sample}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("name", choices=("ENAT-S", "ENAT-B", "ENAT-L"))
    p.add_argument("--resolution", type=int, default=256, choices=(256, 512))
    p.add_argument("--batch-size", type=int, default=32)
    add_old_spelling(p, "--batch", "--batch-size", "batch_size", type=int)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--provider", default="enat", choices=tuple(RUNS))
    p.add_argument("--weights", default="bf16", choices=("autocast", "fp16", "bf16"))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--top", type=int, default=15)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("profile_sample.py profiles GPU runs; this machine has no CUDA GPU")

    cfg = enat.config(args.name, args.resolution)
    torch.manual_seed(0)
    model = (enat.PlainNAT if args.provider == "plain-nat" else enat.ENAT)(cfg).cuda().eval()
    if args.weights != "autocast":
        model = model.to({"fp16": torch.float16, "bf16": torch.bfloat16}[args.weights])
    labels = torch.arange(args.batch_size, device="cuda") * 37 % 1000
    run = RUNS[args.provider]
    settings = dict(steps=args.steps, cfg_scale=cfg.cfg_scale, mask_temp=cfg.mask_temp, samp_temp=cfg.samp_temp,
                    reuse=args.provider != "enat-no-reuse")
    autocast = torch.autocast("cuda", torch.float16) if args.weights == "autocast" else contextlib.nullcontext()

    def generate():
        with autocast:
            return run(model, labels, generator=torch.Generator("cuda").manual_seed(0), **settings)

    generate()  # compile and autotune outside the timings
    torch.cuda.synchronize()
    walls = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        generate()
        host = time.perf_counter() - start
        torch.cuda.synchronize()
        walls.append((time.perf_counter() - start, host))
    wall, host = sorted(walls)[len(walls) // 2]
    print(f"{args.name} {args.resolution}px B{args.batch_size} T{args.steps} {args.provider} weights={args.weights} "
          f"on {torch.cuda.get_device_name()}: {args.batch_size / wall:.1f} images/s, wall {wall * 1e3:.1f} ms, "
          f"host returns after {host * 1e3:.1f} ms")

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        generate()
        torch.cuda.synchronize()
    events = prof.key_averages()
    device_total = sum(e.self_device_time_total for e in events) / 1e3
    print(f"device busy {device_total:.1f} ms of {wall * 1e3:.1f} ms wall ({100 * device_total / wall / 1e3:.0f}%), "
          f"{sum(e.count for e in events)} kernels and copies")
    print(events.table(sort_by="self_cuda_time_total", row_limit=args.top, max_name_column_width=70))


if __name__ == "__main__":
    main()

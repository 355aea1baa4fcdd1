"""Train ENAT on a token file: `python -m enat.train` (one process) or under torchrun (data parallel).

    python -m enat.train --config ENAT-S --data tokens.npy --out runs/s --batch 256 --steps 100000
    torchrun --nproc_per_node=8 -m enat.train --config ENAT-L --data tokens.npy --out runs/l --batch 2048 --bf16
    torchrun --nnodes=4 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 -m enat.train ...
    python -m enat.train ... --resume             # continue from OUT/checkpoints/latest.pt (or --resume PATH)

The data: a .npy integer array (N, 1 + L), one row per image: the label, then the L token ids (the
layout of the paper's code; enat.training.TokenDataset, memory-mapped). The recipe is
enat.training's (Beta(12, 3) mask ratio, reuse on `--reuse-prob` of the batches with the EMA model's
features, chains of up to `--reuse-steps` previous steps (1: the paper's), label smoothing 0.1, label
dropout 0.15 + 0.1, AdamW (0.99, 0.99), weight decay 0.03 on Linear weights, linear warm-up then
constant lr). The EMA's decay `--ema` is warmed up, min(decay, (1 + t) / (10 + t)) at update t
(enat.training.EMA); `--no-ema-warmup` keeps it fixed from the start, as the paper does.

With WORLD_SIZE > 1 (torchrun) the processes form a torch.distributed group (NCCL on GPUs, gloo on
CPUs) and train one DistributedDataParallel model: each optimizer step takes `--batch` rows (the
global batch) in `--accum` micro-steps; rank r reads the r-th block of each micro-step's rows of a
seeded permutation of the data (enat.training.shard_indices), and every rank draws the masks of the
whole micro-step from one shared generator and keeps its rows, so the run computes the gradients of
one process on the global batch (up to the order of floating-point sums).

OUT/ receives log.txt (a line per --log-every steps: loss, lr, images/s), checkpoints/step_XXXXXXX.pt
and checkpoints/latest.pt (model, EMA, optimizer, scheduler, grad scaler, step, every rank's RNG
states, the loss generator, the config and arguments; the model and EMA weights under the official
key names, the EMA's under "state_dict" beside its update count, so enat.load_official(ckpt["ema"],
cfg) loads them), and samples/step_XXXXXXX.png / .npy (grids sampled from the EMA model, one class
per row, with the sampler settings of the config unless --cfg-scale, --mask-temp or --samp-temp
say otherwise; the PNG colours each token id, since there is no VQ decoder here). `--resume`
continues bit for bit on the same device type and process count; a checkpoint written before the
EMA stored its update count resumes with the count set to its step (one update per step).
"""

import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

from . import training
from .config import ENATConfig, config as named_config
from .model import ENAT
from .sampler import sample, settings as sampler_settings


def build_parser():
    p = argparse.ArgumentParser(prog="python -m enat.train", description="Train ENAT on a token file "
                                "(runs under torchrun for data parallelism).")
    g = p.add_argument_group("model")
    g.add_argument("--config", default=None, help="ENAT-S, ENAT-B or ENAT-L (or give the sizes below)")
    g.add_argument("--depth-enc", type=int)
    g.add_argument("--depth-dec", type=int)
    g.add_argument("--width", type=int)
    g.add_argument("--heads", type=int)
    g.add_argument("--resolution", type=int, default=None, help="pixels; resolution / 16 tokens per side (default 256)")
    g.add_argument("--vocab-size", type=int, default=None, help="codebook size; [MASK] is this id (default 1024)")
    g.add_argument("--num-classes", type=int, default=None, help="classes; the null class is this id (default 1000)")
    g = p.add_argument_group("data and optimisation")
    g.add_argument("--data", required=True, help=".npy int array (N, 1 + L): label, then the token ids, per row")
    g.add_argument("--batch", type=int, default=256, help="global batch per optimizer step (all processes)")
    g.add_argument("--accum", type=int, default=1, help="gradient-accumulation micro-steps per optimizer step")
    g.add_argument("--lr", type=float, default=training.LEARNING_RATE)
    g.add_argument("--warmup", type=int, default=training.WARMUP_STEPS)
    g.add_argument("--weight-decay", type=float, default=training.WEIGHT_DECAY)
    g.add_argument("--steps", type=int, default=100_000, help="optimizer steps in all")
    g.add_argument("--grad-clip", type=float, default=0.0, help="clip the gradient norm (0: off, the paper's)")
    g.add_argument("--ema", type=float, default=training.EMA_DECAY, help="EMA decay")
    g.add_argument("--ema-warmup", action=argparse.BooleanOptionalAction, default=True,
                   help="warm the EMA decay up: min(decay, (1 + t) / (10 + t)) at update t (default; "
                        "--no-ema-warmup: the paper's fixed decay)")
    g.add_argument("--reuse-prob", type=float, default=training.REUSE_PROB)
    g.add_argument("--reuse-steps", type=int, default=1,
                   help="longest chain of previous steps in reuse batches (1: the paper's recipe; "
                        "enat.training, 'Chained previous steps')")
    prec = g.add_mutually_exclusive_group()
    prec.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU; a CPU run stays fp32)")
    prec.add_argument("--fp16", action="store_true", help="fp16 autocast with loss scaling (GPU; the paper's)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default=None, help="default: cuda (the local rank's GPU) if available, else cpu")
    g = p.add_argument_group("output")
    g.add_argument("--out", required=True, help="output folder")
    g.add_argument("--log-every", type=int, default=100)
    g.add_argument("--ckpt-every", type=int, default=5000)
    g.add_argument("--sample-every", type=int, default=5000, help="0: never")
    g.add_argument("--sample-per-class", type=int, default=4)
    g.add_argument("--sample-classes", type=int, default=16, help="first classes to sample")
    g.add_argument("--sample-steps", type=int, default=8, help="sampling steps of the sample grids")
    for name in ("cfg-scale", "mask-temp", "samp-temp"):
        g.add_argument(f"--{name}", type=float, default=None,
                       help=f"{name.replace('-', '_')} of the sample grids (default: the config's)")
    g.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="continue from OUT/checkpoints/latest.pt, or from the checkpoint given")
    g.add_argument("--no-progress", action="store_true")
    return p


def model_config(args):
    extra = {k: v for k, v in (("vocab_size", args.vocab_size), ("num_classes", args.num_classes)) if v is not None}
    sizes = (args.depth_enc, args.depth_dec, args.width, args.heads)
    if args.config:
        cfg = named_config(args.config, args.resolution or 256)
        changes = {k: v for k, v in zip(("depth_enc", "depth_dec", "width", "heads"), sizes) if v is not None}
        return dataclasses.replace(cfg, **changes, **extra)
    if any(v is None for v in sizes):
        raise SystemExit("give --config ENAT-S/B/L or all of --depth-enc, --depth-dec, --width, --heads")
    return ENATConfig("custom", *sizes, resolution=args.resolution or 256, **extra)


class Distributed:
    """The process group when WORLD_SIZE > 1 (torchrun sets it), else one process."""

    def __init__(self, device_arg):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device_arg:
            self.device = torch.device(device_arg)
        elif torch.cuda.is_available():
            self.device = torch.device("cuda", self.local_rank)
        else:
            self.device = torch.device("cpu")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if self.world > 1:
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    @property
    def main(self):
        return self.rank == 0

    def mean(self, value):
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.item() / self.world

    def gather(self, obj):
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self):
        if self.world > 1:
            dist.barrier()

    def close(self):
        if self.world > 1:
            dist.destroy_process_group()


def data_parallel(model, device):
    """`model` in DistributedDataParallel, without find_unused_parameters: enat.training.loss makes
    every parameter take part in every step (the ones a step's forward skips, prev_proj without reuse
    and the encoder in a reuse step without critical tokens, enter the loss with weight 0; see
    enat.training.skipped_parameters), so DDP's reduction gets every gradient without the extra
    autograd traversal that find_unused_parameters costs each step (and the warning it gives when it
    finds nothing)."""
    device_ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def _rng_state(device):
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state, device):
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def save_checkpoint(path, *, model, ema, opt, sched, scaler, step, loss_gen, cfg, args, rng_states):
    state = {
        "step": step, "config": dataclasses.asdict(cfg), "args": vars(args),
        "model": training.unwrap(model).state_dict(), "ema": ema.state_dict(),
        "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "loss_generator": loss_gen.get_state(), "rng": rng_states,  # one per rank
    }
    tmp = f"{path}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def palette(vocab_size):
    """(vocab_size, 3) uint8: token id -> a colour; evenly spread hues for small vocabularies,
    fixed pseudo-random colours for large ones."""
    if vocab_size <= 64:
        import colorsys

        cols = [colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.55 + 0.45 * (i % 2), 0.95 - 0.35 * (i // 2 % 2))
                for i in range(vocab_size)]
        return (np.array(cols) * 255).astype(np.uint8)
    return np.random.default_rng(1234).integers(0, 256, (vocab_size, 3), dtype=np.uint8)


def write_samples(model, cfg, out_dir, step, per_class, n_classes, seed, device, settings):
    """Sample grids from `model` (one row per class) with the sampler `settings` (keywords of
    enat.sample) and write them as .npy and as a palette PNG."""
    from .demo import render

    n_classes = min(n_classes, cfg.num_classes)
    labels = torch.arange(n_classes, device=device).repeat_interleave(per_class)
    gen = torch.Generator(device).manual_seed(seed)  # its own generator: training's RNG streams stay untouched
    ids = sample(model, labels, generator=gen, **settings).cpu().numpy()
    os.makedirs(out_dir, exist_ok=True)
    base = os.path.join(out_dir, f"step_{step:07d}")
    np.save(base + ".npy", np.concatenate([labels.cpu().numpy()[:, None], ids], axis=1))
    rows = [ids[c * per_class:(c + 1) * per_class] for c in range(n_classes)]
    render(None, base + ".png", rows_of=rows, cell=max(1, 96 // int(math.isqrt(cfg.seq_len))),
           palette=palette(cfg.vocab_size))
    return base + ".png"


def main(argv=None):
    args = build_parser().parse_args(argv)
    cfg = model_config(args)
    env = Distributed(args.device)
    try:
        return _train(args, cfg, env)
    finally:
        env.close()


def _train(args, cfg, env):
    device, world, rank = env.device, env.world, env.rank
    if args.batch % (world * args.accum):
        raise SystemExit(f"--batch ({args.batch}) must be divisible by processes x --accum ({world} x {args.accum})")
    micro = args.batch // (world * args.accum)
    if args.reuse_steps < 1:
        raise SystemExit(f"--reuse-steps must be at least 1 (1: the paper's recipe), got {args.reuse_steps}")
    if not 0.0 <= args.ema <= 1.0:
        raise SystemExit(f"--ema must lie in [0, 1], got {args.ema}")
    if args.sample_steps < 1:
        raise SystemExit(f"--sample-steps must be at least 1, got {args.sample_steps}")
    for name in ("cfg_scale", "mask_temp", "samp_temp"):
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise SystemExit(f"--{name.replace('_', '-')} must be a finite number >= 0, got {value}")
    data = training.TokenDataset(args.data)
    if env.main:
        data.check(cfg)
    amp_dtype = (torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else None) if device.type == "cuda" else None
    if (args.bf16 or args.fp16) and device.type != "cuda" and env.main:
        print("enat.train: autocast applies on GPUs only; this CPU run is fp32", file=sys.stderr)

    torch.manual_seed(args.seed)  # the same initial weights on every rank
    model = ENAT(cfg).to(device).train()
    settings = {"steps": args.sample_steps,  # the sample grids': the flags, else the config's
                **sampler_settings(model, args.cfg_scale, args.mask_temp, args.samp_temp)}
    ema = training.EMA(model, args.ema, warmup=args.ema_warmup)
    opt, sched = training.optimizer(model, lr=args.lr, warmup=args.warmup, weight_decay=args.weight_decay)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    loss_gen = torch.Generator().manual_seed(args.seed)  # shared by every rank: the global batch's masks
    torch.manual_seed(args.seed * 1000 + rank + 1)  # in-model dropout: each rank its own stream
    if device.type == "cuda":
        torch.cuda.manual_seed(args.seed * 1000 + rank + 1)
    ckpt_dir, sample_dir = os.path.join(args.out, "checkpoints"), os.path.join(args.out, "samples")
    os.makedirs(ckpt_dir, exist_ok=True)

    step = 0
    if args.resume:
        path = os.path.join(ckpt_dir, "latest.pt") if args.resume == "latest" else args.resume
        state = torch.load(path, map_location="cpu", weights_only=False)
        if state["config"] != dataclasses.asdict(cfg):
            raise SystemExit(f"{path} holds a model of config {state['config']}, not {dataclasses.asdict(cfg)}")
        model.load_state_dict(state["model"])
        # A checkpoint written before the EMA stored its update count holds bare weights: the count
        # is its step (one update per optimizer step), what a newer checkpoint would have stored.
        ema.load_state_dict(state["ema"], updates=None if "updates" in state["ema"] else state["step"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        loss_gen.set_state(state["loss_generator"])
        if len(state["rng"]) == world:
            _set_rng_state(state["rng"][rank], device)
        elif env.main:
            print(f"enat.train: the checkpoint has RNG states of {len(state['rng'])} processes, this run {world}: "
                  "dropout draws start afresh", file=sys.stderr)
        step = state["step"]
        if env.main:
            print(f"enat.train: resumed from {path} at step {step}")

    net = data_parallel(model, device) if world > 1 else model

    log_path = os.path.join(args.out, "log.txt")
    if env.main:
        n_params = sum(p.numel() for p in model.parameters())
        header = (f"enat.train: {cfg.name} ({n_params / 1e6:.2f}M parameters, {cfg.seq_len} tokens, vocabulary "
                  f"{cfg.vocab_size}, {cfg.num_classes} classes) on {world} x {device.type}, global batch "
                  f"{args.batch} = {world} x {args.accum} x {micro}, "
                  f"{'bf16' if amp_dtype == torch.bfloat16 else 'fp16' if amp_dtype else 'fp32'}, {len(data)} rows")
        if args.sample_every:
            header += (f"\nsample grids from the EMA model every {args.sample_every} steps: "
                       + ", ".join(f"{name} {value}" for name, value in settings.items()))
        print(header)
        with open(log_path, "a") as f:
            f.write(header + "\n")

    from tqdm.auto import tqdm

    bar = tqdm(total=args.steps, initial=step, desc="enat.train", unit="step", disable=args.no_progress or not env.main)
    loss_sum, loss_n, t_log, step_log = 0.0, 0, time.time(), step
    while step < args.steps:
        for a in range(args.accum):
            rows = training.shard_indices(len(data), step, args.batch, rank=rank, world_size=world, micro_batch=micro,
                                          micro_step=a, seed=args.seed)
            ids, labels = data.batch(rows)
            ids, labels = ids.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            sync = contextlib.nullcontext() if (world == 1 or a == args.accum - 1) else net.no_sync()
            with sync:
                with torch.autocast(device.type, amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
                    loss = training.loss(net, ids, labels, prev_model=ema.model, reuse_prob=args.reuse_prob,
                                         reuse_steps=args.reuse_steps, generator=loss_gen, shard=(rank, world))
                scaled = loss / args.accum
                (scaler.scale(scaled) if scaler is not None else scaled).backward()
            loss_sum += loss.detach()
            loss_n += 1
        if scaler is not None:
            scaler.unscale_(opt)
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        ema.update(model)
        step += 1
        bar.update(1)

        if step % args.log_every == 0 or step == args.steps:
            mean_loss = env.mean(float(loss_sum) / max(loss_n, 1))
            now = time.time()
            rate = (step - step_log) * args.batch / max(now - t_log, 1e-9)
            line = (f"step {step}/{args.steps} loss {mean_loss:.4f} lr {sched.get_last_lr()[0]:.3g} "
                    f"images/s {rate:.1f}")
            if env.main:
                bar.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{rate:.0f}")
                bar.write(line) if not args.no_progress else print(line)
                with open(log_path, "a") as f:
                    f.write(line + "\n")
            loss_sum, loss_n, t_log, step_log = 0.0, 0, time.time(), step
        if step % args.ckpt_every == 0 or step == args.steps:
            rng_states = env.gather(_rng_state(device))
            if env.main:
                path = os.path.join(ckpt_dir, f"step_{step:07d}.pt")
                save_checkpoint(path, model=model, ema=ema, opt=opt, sched=sched, scaler=scaler, step=step,
                                loss_gen=loss_gen, cfg=cfg, args=args, rng_states=rng_states)
                latest = os.path.join(ckpt_dir, "latest.pt")
                tmp = latest + ".tmp"
                if os.path.lexists(tmp):
                    os.remove(tmp)
                os.symlink(os.path.basename(path), tmp)
                os.replace(tmp, latest)
            env.barrier()
        if args.sample_every and (step % args.sample_every == 0 or step == args.steps) and env.main:
            png = write_samples(ema.model, cfg, sample_dir, step, args.sample_per_class, args.sample_classes,
                                args.seed, device, settings)
            bar.write(f"samples: {png}") if not args.no_progress else print(f"samples: {png}")
    bar.close()
    if env.main:
        with open(os.path.join(args.out, "config.json"), "w") as f:
            json.dump({"config": dataclasses.asdict(cfg), "args": vars(args)}, f, indent=1)
    return model, ema


if __name__ == "__main__":
    main()

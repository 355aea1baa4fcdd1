"""Train ENAT on a token file: `python -m enat.train` (one process) or under torchrun (data parallel).

    python -m enat.train --model ENAT-S --data tokens.npy --out runs/s --batch-size 256 --steps 100000
    torchrun --nproc_per_node=8 -m enat.train --model ENAT-L --data tokens.npy --out runs/l --batch-size 2048 --dtype bf16
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
CPUs) and train one DistributedDataParallel model: each optimizer step takes `--batch-size` rows (the
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

The old spellings --config, --batch, --bf16 and --fp16 still work, with a deprecation warning: they are
--model, --batch-size, --dtype bf16 and --dtype fp16.
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

from . import training
from .cli import Distributed, add_old_spelling, progress_bar
from .config import ENATConfig, config as named_config
from .model import ENAT
from .sampler import sample, settings as sampler_settings


def build_parser():
    p = argparse.ArgumentParser(prog="python -m enat.train", description="Train ENAT on a token file "
                                "(runs under torchrun for data parallelism).")
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None, help="ENAT-S, ENAT-B or ENAT-L (or give the sizes below)")
    add_old_spelling(g, "--config", "--model", "model")
    g.add_argument("--depth-enc", type=int)
    g.add_argument("--depth-dec", type=int)
    g.add_argument("--width", type=int)
    g.add_argument("--heads", type=int)
    g.add_argument("--resolution", type=int, default=None, help="pixels; resolution / 16 tokens per side (default 256)")
    g.add_argument("--vocab-size", type=int, default=None, help="codebook size; [MASK] is this id (default 1024)")
    g.add_argument("--num-classes", type=int, default=None, help="classes; the null class is this id (default 1000)")
    g = p.add_argument_group("data and optimisation")
    g.add_argument("--data", required=True, help=".npy int array (N, 1 + L): label, then the token ids, per row")
    g.add_argument("--batch-size", type=int, default=256, help="global batch per optimizer step (all processes)")
    add_old_spelling(g, "--batch", "--batch-size", "batch_size", type=int)
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
    prec.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32",
                      help="autocast on GPUs: bf16, or fp16 with loss scaling (the paper's); fp32 (default) none; "
                           "a CPU run stays fp32")
    add_old_spelling(prec, "--bf16", "--dtype", "dtype", const="bf16")
    add_old_spelling(prec, "--fp16", "--dtype", "dtype", const="fp16")
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
    if args.model:
        cfg = named_config(args.model, args.resolution or 256)
        changes = {k: v for k, v in zip(("depth_enc", "depth_dec", "width", "heads"), sizes) if v is not None}
        return dataclasses.replace(cfg, **changes, **extra)
    if any(v is None for v in sizes):
        raise SystemExit("give --model ENAT-S/B/L or all of --depth-enc, --depth-dec, --width, --heads")
    return ENATConfig("custom", *sizes, resolution=args.resolution or 256, **extra)


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


@dataclasses.dataclass
class _Run:
    """What a run trains and carries from step to step; `net` is `model`, in DistributedDataParallel
    when there are several processes."""
    model: ENAT
    net: torch.nn.Module
    ema: training.EMA
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None  # fp16 autocast's loss scaling, else None
    loss_gen: torch.Generator  # shared by every rank: the masks of the global batch
    amp_dtype: torch.dtype | None  # autocast's dtype, None without autocast
    micro: int  # rows per micro-step and process
    step: int = 0


def _train(args, cfg, env):
    """The run: set-up, resume, then optimizer steps with logging, checkpoints and sample grids.
    Returns (the model, its EMA)."""
    micro = _check_args(args, env.world)
    data = training.TokenDataset(args.data)
    if env.main:
        data.check(cfg)
    run, settings = _set_up(args, cfg, env, micro)
    ckpt_dir, sample_dir = os.path.join(args.out, "checkpoints"), os.path.join(args.out, "samples")
    os.makedirs(ckpt_dir, exist_ok=True)
    if args.resume:
        _resume(args, cfg, env, run, ckpt_dir)
    run.net = data_parallel(run.model, env.device) if env.world > 1 else run.model
    log_path = os.path.join(args.out, "log.txt")
    if env.main:
        _log(_header(args, cfg, env, run, settings, len(data)), log_path)

    bar = progress_bar("enat.train", args.steps, "step", initial=run.step, enabled=not args.no_progress and env.main)
    say = print if args.no_progress else bar.write
    loss_sum, loss_n, t_log, step_log = 0.0, 0, time.time(), run.step
    while run.step < args.steps:
        for loss in _step(args, env, run, data):
            loss_sum += loss
            loss_n += 1
        bar.update(1)
        if run.step % args.log_every == 0 or run.step == args.steps:
            mean_loss = env.mean(float(loss_sum) / max(loss_n, 1))
            rate = (run.step - step_log) * args.batch_size / max(time.time() - t_log, 1e-9)
            if env.main:
                bar.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{rate:.0f}")
                _log(f"step {run.step}/{args.steps} loss {mean_loss:.4f} lr {run.sched.get_last_lr()[0]:.3g} "
                     f"images/s {rate:.1f}", log_path, say)
            loss_sum, loss_n, t_log, step_log = 0.0, 0, time.time(), run.step
        if run.step % args.ckpt_every == 0 or run.step == args.steps:
            _checkpoint(args, cfg, env, run, ckpt_dir)
        if args.sample_every and (run.step % args.sample_every == 0 or run.step == args.steps) and env.main:
            png = write_samples(run.ema.model, cfg, sample_dir, run.step, args.sample_per_class, args.sample_classes,
                                args.seed, env.device, settings)
            say(f"samples: {png}")
    bar.close()
    if env.main:
        with open(os.path.join(args.out, "config.json"), "w") as f:
            json.dump({"config": dataclasses.asdict(cfg), "args": vars(args)}, f, indent=1)
    return run.model, run.ema


def _check_args(args, world):
    """Rows per micro-step and process, once the flags are checked (SystemExit naming the flag)."""
    if args.batch_size % (world * args.accum):
        raise SystemExit(f"--batch-size ({args.batch_size}) must be divisible by processes x --accum "
                         f"({world} x {args.accum})")
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
    return args.batch_size // (world * args.accum)


def _set_up(args, cfg, env, micro):
    """(the _Run at step 0, the sample grids' sampler settings): the same initial weights on every rank
    (seed --seed), then each rank's own dropout stream."""
    device = env.device
    amp_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    if device.type != "cuda":
        if amp_dtype is not None and env.main:
            print("enat.train: autocast applies on GPUs only; this CPU run is fp32", file=sys.stderr)
        amp_dtype = None
    torch.manual_seed(args.seed)
    model = ENAT(cfg).to(device).train()
    settings = {"steps": args.sample_steps,  # the sample grids': the flags, else the config's
                **sampler_settings(model, args.cfg_scale, args.mask_temp, args.samp_temp)}
    ema = training.EMA(model, args.ema, warmup=args.ema_warmup)
    opt, sched = training.optimizer(model, lr=args.lr, warmup=args.warmup, weight_decay=args.weight_decay)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    loss_gen = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed * 1000 + env.rank + 1)  # in-model dropout: each rank its own stream
    if device.type == "cuda":
        torch.cuda.manual_seed(args.seed * 1000 + env.rank + 1)
    return _Run(model, model, ema, opt, sched, scaler, loss_gen, amp_dtype, micro), settings


def _resume(args, cfg, env, run, ckpt_dir):
    """Load --resume's checkpoint (OUT/checkpoints/latest.pt for a bare --resume) into `run`."""
    path = os.path.join(ckpt_dir, "latest.pt") if args.resume == "latest" else args.resume
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state["config"] != dataclasses.asdict(cfg):
        raise SystemExit(f"{path} holds a model of config {state['config']}, not {dataclasses.asdict(cfg)}")
    run.model.load_state_dict(state["model"])
    # A checkpoint written before the EMA stored its update count holds bare weights: the count
    # is its step (one update per optimizer step), what a newer checkpoint would have stored.
    run.ema.load_state_dict(state["ema"], updates=None if "updates" in state["ema"] else state["step"])
    run.opt.load_state_dict(state["optimizer"])
    run.sched.load_state_dict(state["scheduler"])
    if run.scaler is not None and state.get("scaler"):
        run.scaler.load_state_dict(state["scaler"])
    run.loss_gen.set_state(state["loss_generator"])
    if len(state["rng"]) == env.world:
        _set_rng_state(state["rng"][env.rank], env.device)
    elif env.main:
        print(f"enat.train: the checkpoint has RNG states of {len(state['rng'])} processes, this run {env.world}: "
              "dropout draws start afresh", file=sys.stderr)
    run.step = state["step"]
    if env.main:
        print(f"enat.train: resumed from {path} at step {run.step}")


def _header(args, cfg, env, run, settings, rows):
    """The run's description, the first lines of the log."""
    n_params = sum(p.numel() for p in run.model.parameters())
    precision = {torch.bfloat16: "bf16", torch.float16: "fp16", None: "fp32"}[run.amp_dtype]
    header = (f"enat.train: {cfg.name} ({n_params / 1e6:.2f}M parameters, {cfg.seq_len} tokens, vocabulary "
              f"{cfg.vocab_size}, {cfg.num_classes} classes) on {env.world} x {env.device.type}, global batch "
              f"{args.batch_size} = {env.world} x {args.accum} x {run.micro}, {precision}, {rows} rows")
    if args.sample_every:
        header += (f"\nsample grids from the EMA model every {args.sample_every} steps: "
                   + ", ".join(f"{name} {value}" for name, value in settings.items()))
    return header


def _log(text, log_path, say=print):
    """Show `text` (with `say`) and append it to the log file."""
    say(text)
    with open(log_path, "a") as f:
        f.write(text + "\n")


def _step(args, env, run, data):
    """One optimizer step of --batch-size rows in --accum micro-steps, the EMA updated after it.
    Returns the micro-steps' losses (detached 0-dim tensors)."""
    device, world, rank = env.device, env.world, env.rank
    losses = []
    for a in range(args.accum):
        rows = training.shard_indices(len(data), run.step, args.batch_size, rank=rank, world_size=world,
                                      micro_batch=run.micro, micro_step=a, seed=args.seed)
        ids, labels = data.batch(rows)
        ids, labels = ids.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        sync = contextlib.nullcontext() if (world == 1 or a == args.accum - 1) else run.net.no_sync()
        with sync:
            with torch.autocast(device.type, run.amp_dtype or torch.bfloat16, enabled=run.amp_dtype is not None):
                loss = training.loss(run.net, ids, labels, prev_model=run.ema.model, reuse_prob=args.reuse_prob,
                                     reuse_steps=args.reuse_steps, generator=run.loss_gen, shard=(rank, world))
            scaled = loss / args.accum
            (run.scaler.scale(scaled) if run.scaler is not None else scaled).backward()
        losses.append(loss.detach())
    if run.scaler is not None:
        run.scaler.unscale_(run.opt)
    if args.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), args.grad_clip)
    if run.scaler is not None:
        run.scaler.step(run.opt)
        run.scaler.update()
    else:
        run.opt.step()
    run.sched.step()
    run.opt.zero_grad(set_to_none=True)
    run.ema.update(run.model)
    run.step += 1
    return losses


def _checkpoint(args, cfg, env, run, ckpt_dir):
    """Rank 0 writes checkpoints/step_XXXXXXX.pt (every rank's RNG states gathered into it) and points
    checkpoints/latest.pt at it; the other ranks wait for it."""
    rng_states = env.gather(_rng_state(env.device))
    if env.main:
        path = os.path.join(ckpt_dir, f"step_{run.step:07d}.pt")
        save_checkpoint(path, model=run.model, ema=run.ema, opt=run.opt, sched=run.sched, scaler=run.scaler,
                        step=run.step, loss_gen=run.loss_gen, cfg=cfg, args=args, rng_states=rng_states)
        latest = os.path.join(ckpt_dir, "latest.pt")
        tmp = latest + ".tmp"
        if os.path.lexists(tmp):
            os.remove(tmp)
        os.symlink(os.path.basename(path), tmp)
        os.replace(tmp, latest)
    env.barrier()


if __name__ == "__main__":
    main()

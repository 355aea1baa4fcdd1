"""python -m enat.generate: class-conditional ImageNet images from ENAT and the VQGAN tokenizer, as PNG files.

    python -m enat.generate --model ENAT-L --checkpoint nnet_ema.pth --vq-checkpoint vqgan_jax_strongaug.ckpt \\
        --labels 207 360 387 974 --grid samples.png --out-dir samples/
    python -m enat.generate --random-weights --num-classes 16          # no checkpoints: pipeline and timing
    torchrun --nproc_per_node=8 -m enat.generate ... --num-classes 1024 --batch-size 128   # images split over ranks

The images are generated in batches of --batch-size; batch j draws from torch.Generator(device) seeded
with seed * 1000003 + j, and under torchrun rank r runs batches r, r + N, r + 2N, ... (N processes), so
the images depend on the seed and the batch size but not on the number of processes. Rank 0 gathers and
writes the outputs. At the end it prints images/s for the transformer (enat.sample), for the VQ decoder,
and for both together (the device is synchronised around each timed part).

--model tiny is a small ENAT (2 + 1 blocks, width 64, 2 heads) and --vq-config tiny a narrow VQGAN of
the same 16x shape (enat.vq.TINY_CONFIG), for checking the pipeline on a CPU with --random-weights.
"""

import argparse
import math
import os
import sys
import time

import numpy as np
import torch

from . import vq
from .checkpoint import load_official
from .config import ENATConfig, config
from .model import ENAT
from .sampler import sample

MODELS = ("ENAT-S", "ENAT-B", "ENAT-L", "tiny")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ENAT_SOURCE = ("the ENAT checkpoints released with the paper (ENAT, NeurIPS 2024, arXiv 2411.06959; e.g. "
               "nnet_ema.pth of ENAT-S/B/L at 256 or 512 px)")
SEED_STRIDE = 1_000_003


class CommandError(Exception):
    """A problem with the command's arguments or files: printed as one message, exit status 2."""


def default_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def tiny_config(resolution):
    """The --model tiny ENAT: 2 encoder + 1 decoder blocks, width 64, 2 heads, the 256 px sampler settings."""
    return ENATConfig("tiny", depth_enc=2, depth_dec=1, width=64, heads=2, resolution=resolution)


def model_config(name, resolution):
    if name == "tiny":
        return tiny_config(resolution)
    try:
        return config(name, resolution)
    except ValueError as e:
        raise CommandError(str(e)) from None


def batch_seed(seed, j):
    return seed * SEED_STRIDE + j


def split_work(n_images, batch_size, world_size):
    """The batches each rank runs: a list per rank of (j, start, stop), batch j covering images
    [start, stop) of the request. Batches hold batch_size images (the last one the rest) and go round-robin
    to the ranks, so the batches, and with their seeds the images, do not depend on world_size."""
    if n_images < 0 or batch_size < 1 or world_size < 1:
        raise ValueError(f"split_work: need n_images >= 0, batch_size >= 1, world_size >= 1, got "
                         f"{n_images}, {batch_size}, {world_size}")
    batches = [(j, start, min(start + batch_size, n_images)) for j, start in enumerate(range(0, n_images, batch_size))]
    return [batches[r::world_size] for r in range(world_size)]


def make_grid(images, nrow=None, padding=2):
    """uint8 (N, H, W, 3) -> one uint8 image: nrow images per row (default ceil(sqrt(N))), `padding` black
    pixels around and between them (the grid is rows (H + padding) + padding high)."""
    n, h, w, c = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    grid = np.zeros((rows * (h + padding) + padding, nrow * (w + padding) + padding, c), dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        y, x = padding + r * (h + padding), padding + col * (w + padding)
        grid[y:y + h, x:x + w] = images[i]
    return grid


def to_uint8(images):
    """(B, 3, H, W) float in [0, 1] -> uint8 numpy (B, H, W, 3)."""
    return (images.float() * 255).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def check_file(path, what, source, flag):
    if path is None:
        raise CommandError(f"{flag} is required (the {what}: {source}), or pass --random-weights")
    if not os.path.isfile(path):
        raise CommandError(f"{what} not found: {path!r} ({flag}). It is {source}.")


def load_vq(args, device, dtype, n_embed=None):
    """The VQGAN of --vq-checkpoint (or, with --random-weights, PyTorch's initialisation from seed 0) at
    --vq-config's sizes."""
    cfg = dict(vq.CONFIGS[args.vq_config])
    if n_embed is not None:
        cfg["n_embed"] = n_embed
    if args.random_weights:  # the same weights every run: PyTorch's initialisation from seed 0
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = vq.VQGAN(**cfg).eval()
    else:
        check_file(args.vq_checkpoint, "VQGAN checkpoint", f"the paper's tokenizer, {vq.CHECKPOINT_NAME} "
                   f"({vq.CHECKPOINT_SOURCE})", "--vq-checkpoint")
        try:
            model = vq.load_vqgan(args.vq_checkpoint, **cfg)
        except (ValueError, TypeError) as e:
            raise CommandError(f"{args.vq_checkpoint}: {e}") from None
    return model.to(device, dtype)


def add_device_args(parser, default_dtype):
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=default_dtype,
                        help="weights and activations of the networks (default: %(default)s)")
    parser.add_argument("--vq-checkpoint", default=None,
                        help=f"the VQGAN tokenizer, {vq.CHECKPOINT_NAME} ({vq.CHECKPOINT_SOURCE})")
    parser.add_argument("--vq-config", choices=sorted(vq.CONFIGS), default="paper",
                        help="VQGAN sizes: the paper's (default) or tiny (enat.vq.TINY_CONFIG, for tests)")
    parser.add_argument("--random-weights", action="store_true",
                        help="randomly initialised networks instead of checkpoints (pipeline and timing checks)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser():
    p = argparse.ArgumentParser(prog="python -m enat.generate", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.split("\n")[2:]))
    p.add_argument("--model", choices=MODELS, default="ENAT-L", help="ENAT size (default: %(default)s)")
    p.add_argument("--checkpoint", default=None, help=f"ENAT weights: {ENAT_SOURCE}")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--labels", type=int, nargs="+", default=None, help="class ids to generate, one image each")
    what.add_argument("--num-classes", type=int, default=None, metavar="N",
                      help="N images of random classes (drawn from the seed; default: 8)")
    p.add_argument("--images-per-label", type=int, default=1, help="images per class id (default: 1)")
    p.add_argument("--resolution", type=int, default=256, help="256 or 512 (tiny: any multiple of 16)")
    p.add_argument("--steps", type=int, default=8, help="sampling steps (default: 8)")
    p.add_argument("--cfg-scale", type=float, default=None,
                   help="guidance scale (default: the model's for the resolution)")
    p.add_argument("--mask-temp", type=float, default=None, help="mask temperature (default: the model's)")
    p.add_argument("--samp-temp", type=float, default=None, help="sampling temperature (default: the model's)")
    p.add_argument("--no-reuse", action="store_true", help="ENAT without feature reuse")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32, help="images per batch and process (default: %(default)s)")
    p.add_argument("--grid", default=None, help="write all images as one PNG grid here (default: samples.png "
                                                 "when --out-dir is not given)")
    p.add_argument("--nrow", type=int, default=None, help="images per grid row (default: ceil(sqrt(N)))")
    p.add_argument("--out-dir", default=None, help="write one PNG per image here: {index:05d}_class{label}.png")
    p.add_argument("--warmup", action="store_true", help="run one untimed batch first (compilation, autotuning)")
    add_device_args(p, default_dtype=None)
    return p


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _init_distributed(device_arg):
    """(rank, world, device): torch.distributed only when WORLD_SIZE > 1 (gloo on CPU, nccl on GPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = torch.device(device_arg or default_device())
    if world <= 1:
        return 0, 1, device
    import torch.distributed as dist

    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world, device


def _labels(args, num_classes):
    if args.labels is not None:
        labels = list(args.labels)
        bad = [x for x in labels if not 0 <= x < num_classes]
        if bad:
            raise CommandError(f"--labels must be class ids in [0, {num_classes}), got {bad}")
    else:
        n = 8 if args.num_classes is None else args.num_classes
        if n < 1:
            raise CommandError(f"--num-classes must be >= 1, got {n}")
        labels = torch.randint(0, num_classes, (n,), generator=torch.Generator().manual_seed(args.seed)).tolist()
    if args.images_per_label < 1:
        raise CommandError(f"--images-per-label must be >= 1, got {args.images_per_label}")
    return [x for x in labels for _ in range(args.images_per_label)]


def run(args):
    rank, world, device = _init_distributed(args.device)
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    if args.batch_size < 1 or args.steps < 1:
        raise CommandError(f"--batch-size and --steps must be >= 1, got {args.batch_size} and {args.steps}")
    cfg = model_config(args.model, args.resolution)
    labels = _labels(args, getattr(cfg, "num_classes", 1000))
    settings = dict(steps=args.steps, reuse=not args.no_reuse,
                    cfg_scale=cfg.cfg_scale if args.cfg_scale is None else args.cfg_scale,
                    mask_temp=cfg.mask_temp if args.mask_temp is None else args.mask_temp,
                    samp_temp=cfg.samp_temp if args.samp_temp is None else args.samp_temp)
    grid_path = args.grid if (args.grid or args.out_dir) else "samples.png"

    torch.manual_seed(args.seed)
    if args.random_weights:
        model = ENAT(cfg).eval()
    else:
        check_file(args.checkpoint, "ENAT checkpoint", ENAT_SOURCE, "--checkpoint")
        try:
            model = load_official(args.checkpoint, cfg)
        except (ValueError, TypeError) as e:
            raise CommandError(f"{args.checkpoint}: {e}") from None
    model = model.to(device, dtype)
    vqgan = load_vq(args, device, dtype, n_embed=getattr(cfg, "vocab_size", 1024))
    if vqgan.downsample * math.isqrt(cfg.seq_len) != cfg.resolution:
        raise CommandError(f"the VQGAN's {vqgan.downsample}x grid does not give {cfg.resolution} px")

    mine = split_work(len(labels), args.batch_size, world)[rank]
    if args.warmup and mine:
        j, start, stop = mine[0]
        with torch.no_grad():
            vqgan.decode(sample(model, torch.tensor(labels[start:stop], device=device), **settings))
        _sync(device)

    outputs, t_model, t_decode = [], 0.0, 0.0
    bar = None
    if rank == 0 and not args.no_progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(stop - start for _, start, stop in mine), desc="enat.generate", unit="img")
    for j, start, stop in mine:
        batch_labels = torch.tensor(labels[start:stop], dtype=torch.int64, device=device)
        generator = torch.Generator(device).manual_seed(batch_seed(args.seed, j))
        _sync(device)
        t0 = time.perf_counter()
        ids = sample(model, batch_labels, generator=generator, **settings)
        _sync(device)
        t1 = time.perf_counter()
        with torch.no_grad():
            images = vqgan.decode(ids)
        _sync(device)
        t2 = time.perf_counter()
        t_model, t_decode = t_model + t1 - t0, t_decode + t2 - t1
        outputs.append((start, to_uint8(images)))
        if bar is not None:
            bar.update(stop - start)
    if bar is not None:
        bar.close()
    stats = dict(images=sum(len(a) for _, a in outputs), model_s=t_model, decode_s=t_decode)

    if world > 1:
        import torch.distributed as dist

        gathered = [None] * world if rank == 0 else None
        dist.gather_object((outputs, stats), gathered, dst=0)
        dist.destroy_process_group()
        if rank != 0:
            return
        outputs = [o for part, _ in gathered for o in part]
        all_stats = [s for _, s in gathered]
    else:
        all_stats = [stats]
    images = np.concatenate([a for _, a in sorted(outputs, key=lambda o: o[0])])
    _write(images, labels, grid_path, args)
    _report(len(labels), all_stats, cfg, device, dtype, world)


def _write(images, labels, grid_path, args):
    from PIL import Image

    if grid_path:
        os.makedirs(os.path.dirname(os.path.abspath(grid_path)), exist_ok=True)
        Image.fromarray(make_grid(images, args.nrow)).save(grid_path)
        print(f"wrote {grid_path}: {len(images)} images of {images.shape[2]} x {images.shape[1]} px in a grid")
    if args.out_dir:
        os.makedirs(args.out_dir, exist_ok=True)
        for i, (image, label) in enumerate(zip(images, labels)):
            Image.fromarray(image).save(os.path.join(args.out_dir, f"{i:05d}_class{label}.png"))
        print(f"wrote {len(images)} PNG files to {args.out_dir}")


def _report(n, all_stats, cfg, device, dtype, world):
    """images/s: the busiest rank's time decides (all ranks run at once)."""
    model_s = max(s["model_s"] for s in all_stats)
    decode_s = max(s["decode_s"] for s in all_stats)
    total_s = max(s["model_s"] + s["decode_s"] for s in all_stats)

    def rate(seconds):
        return f"{n / seconds:.2f} images/s" if seconds > 0 else "n/a"

    procs = f", {world} processes" if world > 1 else ""
    print(f"{n} images, {cfg.name} at {cfg.resolution} px on {device} ({str(dtype).removeprefix('torch.')}{procs}):")
    print(f"  transformer (enat.sample) {model_s:.3f} s  {rate(model_s)}")
    print(f"  VQ decoder                {decode_s:.3f} s  {rate(decode_s)}")
    print(f"  together                  {total_s:.3f} s  {rate(total_s)}")


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except CommandError as e:
        print(f"python -m enat.generate: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

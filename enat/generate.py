"""python -m enat.generate: class-conditional ImageNet images from ENAT and the VQGAN tokenizer, as PNG files.

    python -m enat.generate --model ENAT-L --checkpoint nnet_ema.pth --vq-checkpoint vqgan_jax_strongaug.ckpt \\
        --labels 207 360 387 974 --grid samples.png --out-dir samples/
    python -m enat.generate --random-weights --num-classes 16          # no checkpoints: pipeline and timing
    torchrun --nproc_per_node=8 -m enat.generate ... --num-classes 1024 --batch-size 128   # images split over ranks
    python -m enat.generate --checkpoint run/checkpoints/latest.pt --save-ids ids.npy    # enat.train's model: ids

--checkpoint takes the paper's state dicts (sizes from --model and --resolution) and the checkpoints of
python -m enat.train (a dict with the config and the EMA weights, which are used: no size flags needed).
--save-ids writes the token ids in the token-file layout (docs/VQ.md: int64 (N, 1 + L), the label then
the L ids per row); with --save-ids alone no images are made and no tokenizer is needed, as for a model
of another vocabulary than the VQGAN's.

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

import numpy as np
import torch

from .cli import (CommandError, add_device_args, add_model_args, check_vq_grid, init_distributed, load_model, load_vq,
                  model_dtype, progress_bar, run_command, sample_batch, sampler_settings, split_work, timed, to_uint8)


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


def build_parser():
    p = argparse.ArgumentParser(prog="python -m enat.generate", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.split("\n")[2:]))
    add_model_args(p)
    what = p.add_mutually_exclusive_group()
    what.add_argument("--labels", type=int, nargs="+", default=None, help="class ids to generate, one image each")
    what.add_argument("--num-classes", type=int, default=None, metavar="N",
                      help="N images of random classes (drawn from the seed; default: 8)")
    p.add_argument("--images-per-label", type=int, default=1, help="images per class id (default: 1)")
    p.add_argument("--batch-size", type=int, default=32, help="images per batch and process (default: %(default)s)")
    p.add_argument("--grid", default=None, help="write all images as one PNG grid here (default: samples.png "
                                                 "when neither --out-dir nor --save-ids is given)")
    p.add_argument("--nrow", type=int, default=None, help="images per grid row (default: ceil(sqrt(N)))")
    p.add_argument("--out-dir", default=None, help="write one PNG per image here: {index:05d}_class{label}.png")
    p.add_argument("--save-ids", default=None, metavar="PATH",
                   help="write the token ids here (.npy int64 (N, 1 + L): the label, then the ids); alone, "
                        "no images are made")
    p.add_argument("--warmup", action="store_true", help="run one untimed batch first (compilation, autotuning)")
    add_device_args(p, default_dtype=None)
    return p


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
    if args.batch_size < 1:
        raise CommandError(f"--batch-size must be >= 1, got {args.batch_size}")
    want_images = bool(args.grid or args.out_dir or not args.save_ids)
    if not want_images and args.vq_checkpoint:
        raise CommandError("--vq-checkpoint is not used with --save-ids alone (no images are made): add --grid "
                           "or --out-dir for images, or leave it out")
    rank, world, device = init_distributed(args.device)
    dtype = model_dtype(args, device)
    model, cfg = load_model(args)
    labels = _labels(args, cfg.num_classes)
    settings = sampler_settings(args, cfg)
    grid_path = args.grid if (args.grid or args.out_dir or args.save_ids) else "samples.png"
    model = model.to(device, dtype)
    decode = None
    if want_images:
        vqgan = load_vq(args, device, dtype, n_embed=cfg.vocab_size)
        check_vq_grid(vqgan, cfg)
        decode = torch.no_grad()(vqgan.decode)

    def batch(j, start, stop):
        """(ids, images or None, transformer seconds, decoder seconds) of batch j."""
        batch_labels = torch.tensor(labels[start:stop], dtype=torch.int64, device=device)
        ids, seconds = sample_batch(model, batch_labels, args.seed, j, settings)
        images, decode_seconds = timed(device, decode, ids) if decode else (None, 0.0)
        return ids, images, seconds, decode_seconds

    mine = split_work(len(labels), args.batch_size, world)[rank]
    if args.warmup and mine:
        batch(*mine[0])

    outputs, t_model, t_decode = [], 0.0, 0.0
    bar = progress_bar("enat.generate", sum(stop - start for _, start, stop in mine), "img",
                       enabled=rank == 0 and not args.no_progress)
    for j, start, stop in mine:
        ids, images, seconds, decode_seconds = batch(j, start, stop)
        t_model, t_decode = t_model + seconds, t_decode + decode_seconds
        outputs.append((start, None if images is None else to_uint8(images),
                        ids.cpu().numpy() if args.save_ids else None))
        bar.update(stop - start)
    bar.close()
    stats = dict(model_s=t_model, decode_s=t_decode)

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
    outputs.sort(key=lambda o: o[0])
    if args.save_ids:
        ids = np.concatenate([o[2] for o in outputs]).astype(np.int64)
        _save_ids(args.save_ids, np.concatenate([np.array(labels, dtype=np.int64)[:, None], ids], axis=1))
    if decode is not None:
        _write(np.concatenate([o[1] for o in outputs]), labels, grid_path, args)
    _report(len(labels), all_stats, cfg, device, dtype, world, decoded=decode is not None)


def _save_ids(path, rows):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "wb") as f:  # a file object: np.save adds no .npy suffix
        np.save(f, rows)
    print(f"wrote {path}: {rows.shape[0]} rows x (1 label + {rows.shape[1] - 1} ids), int64")


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


def _report(n, all_stats, cfg, device, dtype, world, decoded):
    """images/s: the busiest rank's time decides (all ranks run at once)."""
    model_s = max(s["model_s"] for s in all_stats)
    decode_s = max(s["decode_s"] for s in all_stats)
    total_s = max(s["model_s"] + s["decode_s"] for s in all_stats)

    def rate(seconds):
        return f"{n / seconds:.2f} images/s" if seconds > 0 else "n/a"

    procs = f", {world} processes" if world > 1 else ""
    print(f"{n} images, {cfg.name} at {cfg.resolution} px on {device} ({str(dtype).removeprefix('torch.')}{procs}):")
    print(f"  transformer (enat.sample) {model_s:.3f} s  {rate(model_s)}")
    if decoded:
        print(f"  VQ decoder                {decode_s:.3f} s  {rate(decode_s)}")
        print(f"  together                  {total_s:.3f} s  {rate(total_s)}")


def main(argv=None):
    return run_command("python -m enat.generate", run, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

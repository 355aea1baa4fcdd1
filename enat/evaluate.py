"""python -m enat.evaluate: FID and Inception Score of ENAT's samples, measured as the paper measures them.

    python -m enat.evaluate --model ENAT-L --checkpoint nnet_ema.pth --vq-checkpoint vqgan_jax_strongaug.ckpt \\
        --inception-weights pt_inception-2015-12-05-6726825d.pth \\
        --reference fid_stats_imagenet256_guided_diffusion.npz --json eval.json
    torchrun --nproc_per_node=8 -m enat.evaluate ... --num-samples 50000   # the same numbers on 8 processes
    python -m enat.evaluate --random-weights --model tiny --vq-config tiny --resolution 64 --num 64  # anywhere
    python -m enat.evaluate stats --images DIR --out ref.npz --inception-weights ...  # reference statistics

Samples: --num-samples of them (50000; --num in one process, as torchrun's own parser takes --num for
its --numa-binding), class-balanced (sample i has class i mod C, C the model's classes or --classes),
in batches of --batch-size (125, the paper's); batch j is sampled from a generator seeded
with seed * 1000003 + j and processes take turns (rank r runs batches r, r + W, ... of W processes;
gloo on CPU, NCCL on GPU), so the samples depend on the seed and the batch size, not on W. Each batch
goes from the VQ decoder (float pixels in [0, 1], as the paper's code feeds them) straight into
pytorch-fid's FID Inception; only running sums are kept (enat.evaluation: float64 sums of the features,
of their outer products and, per IS split, of p(y|x) and p log p), added over the processes at the end,
so the numbers match one process's up to float64 rounding. Prints FID (against --reference) and IS
(10 splits), and images/s of the transformer, the VQ decoder and the Inception, each timed with the
device synchronised around it.

Interrupted runs continue: every --save-every batches each process saves its sums in --state-dir
(a temporary file, then a rename); the same command run again resumes from them and ends with the
numbers of an uninterrupted run. A state made with other settings is refused. It is deleted at the end.

--random-weights runs on random ENAT and VQGAN weights, and random Inception weights unless
--inception-weights is given. --save-npz writes the samples as uint8 (N, H, W, 3) under arr_0 and
their labels under arr_1 (the ADM evaluation suite's layout), first into PATH.partial.npy as the
batches come (memory-mapped, shared by the processes), packed into PATH at the end. --save-stats
writes the samples' mu and sigma in the reference layout. --json writes the numbers, every setting,
SHA-256 of the files, library versions and the time per stage.
"""

import argparse
import dataclasses
import glob
import importlib.metadata
import json
import os
import platform
import sys
import time

import numpy as np
import torch

from . import evaluation as E
from .cli import (DTYPES, CommandError, add_device_args, add_model_args, add_workers_arg, check_vq_grid,
                  default_device, image_batches, init_distributed, load_model, load_vq, model_dtype, progress_bar,
                  run_command, sample_batch, sampler_settings, sha256, split_work, timed, to_uint8)

IMAGE_EXTENSIONS = (".bmp", ".jpg", ".jpeg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp")  # pytorch-fid's
LIBRARIES = ("torch", "torchvision", "pytorch-fid", "scipy", "numpy", "triton", "enat_kernels")


def _add_inception_args(p):
    p.add_argument("--inception-weights", default=None, metavar="PATH",
                   help=f"the FID Inception's weights, {E.INCEPTION_WEIGHTS} ({E.INCEPTION_SOURCE})")
    p.add_argument("--inception-dtype", choices=sorted(DTYPES), default="fp32",
                   help="the Inception's weights and activations (default: fp32; TF32 convolutions on a GPU, "
                        "as PyTorch's default and the paper's runs)")


def build_parser():
    p = argparse.ArgumentParser(prog="python -m enat.evaluate", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.split("\n")[2:]))
    add_model_args(p)
    p.add_argument("--num-samples", "--num", dest="num", type=int, default=50000, metavar="N",
                   help="samples (default: %(default)s, the paper's); under torchrun spell it --num-samples "
                        "(torchrun's own parser reads --num as its --numa-binding)")
    p.add_argument("--classes", type=int, default=None, metavar="C",
                   help="class-balanced over classes 0 .. C-1 (default: all of the model's)")
    p.add_argument("--batch-size", type=int, default=125,
                   help="images per batch; each process runs whole batches (default: %(default)s, the paper's)")
    _add_inception_args(p)
    p.add_argument("--reference", default=None, metavar="PATH", help=f"reference statistics: {E.REFERENCE_SOURCE}; "
                   "without it FID is not computed")
    p.add_argument("--json", default=None, metavar="PATH", help="write the results and settings here")
    p.add_argument("--save-npz", default=None, metavar="PATH",
                   help="write the samples here (uint8, arr_0; labels arr_1)")
    p.add_argument("--save-stats", default=None, metavar="PATH", help="write the samples' mu and sigma here (.npz)")
    p.add_argument("--state-dir", default="enat_evaluate_state",
                   help="where partial sums are saved to resume from (default: %(default)s)")
    p.add_argument("--save-every", type=int, default=10, metavar="K",
                   help="save the sums every K batches (default: 10)")
    p.add_argument("--warmup", action="store_true", help="run one untimed batch first (compilation, autotuning)")
    add_device_args(p, default_dtype=None)
    return p


def build_stats_parser():
    p = argparse.ArgumentParser(prog="python -m enat.evaluate stats",
                                description="Reference statistics for FID: mu and sigma of the FID Inception's "
                                            "features of a folder of images, each center-cropped and resized the "
                                            "ADM way (as enat.tokenize) to --resolution px.")
    p.add_argument("--images", required=True, metavar="DIR", help="a folder of images (subfolders included)")
    p.add_argument("--out", required=True, metavar="PATH", help="the .npz to write (keys mu and sigma)")
    p.add_argument("--resolution", type=int, default=256, help="default: %(default)s")
    _add_inception_args(p)
    p.add_argument("--random-weights", action="store_true", help="random Inception weights (pipeline checks)")
    p.add_argument("--batch-size", type=int, default=125, help="images per Inception batch (default: %(default)s)")
    add_workers_arg(p)
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _inception(args, device):
    """The FID Inception of --inception-weights (random with --random-weights alone), on `device` in
    --inception-dtype; channels_last on a GPU (cuDNN's NHWC kernels), pytorch-fid's layout elsewhere."""
    try:
        inception = E.load_inception(args.inception_weights)
    except (FileNotFoundError, ValueError) as e:
        raise CommandError(f"--inception-weights: {e}") from None
    layout = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    return inception.to(device, DTYPES[args.inception_dtype], memory_format=layout)


def _reference(path):
    try:
        return E.load_reference(path)
    except (FileNotFoundError, ValueError) as e:
        raise CommandError(f"--reference: {e}") from None


def _require_inception(args):
    if args.inception_weights is None and not args.random_weights:
        raise CommandError(f"--inception-weights is required (the FID Inception's weights, {E.INCEPTION_WEIGHTS}: "
                           f"{E.INCEPTION_SOURCE}), or pass --random-weights")


def _check_args(args):
    _require_inception(args)
    for flag, value, low in (("--num-samples", args.num, 2), ("--batch-size", args.batch_size, 1),
                             ("--save-every", args.save_every, 1)):
        if value < low:
            raise CommandError(f"{flag} must be >= {low}{' (a covariance needs two samples)' if low == 2 else ''}, "
                               f"got {value}")


class _State:
    """This process's saved sums, rank{r}.pt in --state-dir: the settings, the FeatureStats state, the number
    of this process's batches done and the seconds spent."""

    def __init__(self, directory, rank, settings):
        self.directory, self.settings = directory, settings
        self.path = os.path.join(directory, f"rank{rank}.pt")
        self.found = sorted(glob.glob(os.path.join(directory, "rank*.pt")))
        for path in self.found:  # every process checks every file, so all refuse together
            saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["settings"]
            changed = sorted(k for k in settings.keys() | saved.keys() if settings.get(k) != saved.get(k))
            if changed:
                was = "; ".join(f"{k}: {saved.get(k)!r}, now {settings.get(k)!r}" for k in changed)
                raise CommandError(f"--state-dir {directory!r} holds a partial evaluation made with other settings "
                                   f"({was}): rerun with those settings to finish it, or delete the folder (or pass "
                                   "another --state-dir) to start afresh")

    def load(self, stats):
        """(batches done, seconds) of this process, its sums loaded into `stats`; (0, zeros) on a fresh start."""
        if not os.path.exists(self.path):
            return 0, dict.fromkeys(("transformer", "decoder", "inception", "wall"), 0.0)
        saved = torch.load(self.path, map_location="cpu", weights_only=True)
        stats.load_state_dict(saved["stats"])
        return saved["done"], saved["seconds"]

    def save(self, stats, done, seconds):
        os.makedirs(self.directory, exist_ok=True)
        tmp = f"{self.path}.tmp"
        torch.save({"settings": self.settings, "stats": stats.state_dict(), "done": done, "seconds": seconds}, tmp)
        os.replace(tmp, self.path)

    def remove(self):
        if os.path.exists(self.path):
            os.remove(self.path)


def _barrier(world):
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def _open_samples(path, shape, rank, world, resuming):
    """The memory-mapped PATH.partial.npy the samples go to: created by rank 0 on a fresh start, reopened
    on a resumed one (it must be there)."""
    partial = f"{path}.partial.npy"
    if not resuming and rank == 0:
        os.makedirs(os.path.dirname(os.path.abspath(partial)), exist_ok=True)
        np.lib.format.open_memmap(partial, mode="w+", dtype=np.uint8, shape=shape).flush()
    _barrier(world)
    try:
        samples = np.lib.format.open_memmap(partial, mode="r+")
    except (OSError, ValueError):
        samples = None
    if samples is None or samples.shape != shape or samples.dtype != np.uint8:
        raise CommandError(f"--save-npz: the partial evaluation expects the samples so far in {partial!r} (uint8 "
                           f"{shape}), which is missing or not that: delete the --state-dir folder to start afresh")
    return samples


def _pack_samples(path, labels):
    """PATH.partial.npy -> PATH (.npz: arr_0 the samples, arr_1 the labels), streamed from the memory map."""
    partial = f"{path}.partial.npy"
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:  # a file object: np.savez adds no suffix
        np.savez(f, arr_0=np.load(partial, mmap_mode="r"), arr_1=labels)
    os.replace(tmp, path)
    os.remove(partial)


def _versions():
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _hashes(args):
    paths = {"checkpoint": args.checkpoint, "vq_checkpoint": args.vq_checkpoint,
             "inception_weights": args.inception_weights, "reference": args.reference}
    return {k: sha256(p) if p else None for k, p in paths.items()}


def run(args):
    _check_args(args)
    rank, world, device = init_distributed(args.device)
    try:
        return _evaluate(args, rank, world, device)
    finally:
        if world > 1:
            import torch.distributed as dist

            dist.destroy_process_group()


def _evaluate(args, rank, world, device):
    """Rank 0's results (None on the other ranks): every input read and checked, then the batches
    measured (resumed from --state-dir), the sums added over the processes and the outputs written."""
    dtype = model_dtype(args, device)
    model, cfg, classes, settings, vqgan, reference, inception = _inputs(args, device, dtype)
    labels = E.class_balanced_labels(args.num, classes)
    if rank == 0 and args.num % classes:
        print(f"enat.evaluate: {args.num} samples are not balanced over {classes} classes (classes 0 .. "
              f"{args.num % classes - 1} come once more than the rest); --classes C with C dividing the number "
              "balances them", file=sys.stderr)
    hashes = _hashes(args)
    fingerprint = dict(model=dataclasses.asdict(cfg), sampler=settings, num=args.num, classes=classes,
                       batch_size=args.batch_size, seed=args.seed, dtype=str(dtype), random_weights=args.random_weights,
                       vq_config=args.vq_config, inception_dtype=args.inception_dtype, device=device.type,
                       processes=world, checkpoint=hashes["checkpoint"], vq_checkpoint=hashes["vq_checkpoint"],
                       inception_weights=hashes["inception_weights"],
                       save_npz=os.path.abspath(args.save_npz) if args.save_npz else None)
    state = _State(args.state_dir, rank, fingerprint)
    stats = E.FeatureStats(args.num, device=device)
    done, seconds = state.load(stats)
    samples = None
    if args.save_npz:
        samples = _open_samples(args.save_npz, (args.num, cfg.resolution, cfg.resolution, 3), rank, world,
                                resuming=bool(state.found))

    def batch(j, start, stop):
        """(images, features, logits, seconds per stage) of batch j."""
        ids, t_model = sample_batch(model, labels[start:stop].to(device), args.seed, j, settings)
        images, t_decode = timed(device, torch.no_grad()(vqgan.decode), ids)
        (features, logits), t_inception = timed(device, inception, images)
        return images, features, logits, (t_model, t_decode, t_inception)

    mine = split_work(args.num, args.batch_size, world)[rank]
    seconds = _run_batches(args, batch, mine, done, seconds, stats, state, samples, rank, world, device)
    timing = torch.tensor([seconds[k] for k in ("transformer", "decoder", "inception", "wall")], dtype=torch.float64,
                          device=device)
    if world > 1:
        import torch.distributed as dist

        stats.all_reduce()
        dist.all_reduce(timing, op=dist.ReduceOp.MAX)  # the busiest process decides
    result = None
    if rank == 0:
        resolved = {k: v for k, v in fingerprint.items() if k not in hashes}  # the hashes go under "sha256"
        result = _finish(args, stats, reference, labels, timing.tolist(), hashes, dict(
            resolved, cfg_name=cfg.name, resolution=cfg.resolution, device_name=_device_name(device)))
    _remove_state(args, state, rank, world)
    return result


def _inputs(args, device, dtype):
    """(ENAT on `device`, its config, the classes, the sampler settings, the VQGAN, the reference
    statistics or None, the FID Inception): every input read and checked before any sampling or writing."""
    model, cfg = load_model(args)
    classes = cfg.num_classes if args.classes is None else args.classes
    if not 1 <= classes <= cfg.num_classes:
        raise CommandError(f"--classes must be in [1, {cfg.num_classes}] (the labels are classes of the model), "
                           f"got {classes}")
    settings = sampler_settings(args, cfg)
    vqgan = load_vq(args, device, dtype, n_embed=cfg.vocab_size)
    check_vq_grid(vqgan, cfg)
    reference = _reference(args.reference) if args.reference else None
    inception = _inception(args, device)
    return model.to(device, dtype), cfg, classes, settings, vqgan, reference, inception


def _run_batches(args, batch, mine, done, seconds, stats, state, samples, rank, world, device):
    """Run this process's batches `mine` from the `done`-th on: each one's features into `stats`, its
    images into `samples` (when saved), the sums saved every --save-every batches and after the last.
    Returns the seconds per stage (`seconds` the ones spent before)."""
    if args.warmup and done < len(mine):
        batch(*mine[done])

    def progress(k):  # images done over all processes when this one has run k batches (they keep pace)
        return min(args.num, k * world * args.batch_size)

    bar = progress_bar("enat.evaluate", args.num, "img", initial=progress(done),
                       enabled=rank == 0 and not args.no_progress)
    wall_start, wall_before = time.perf_counter(), seconds["wall"]
    for k in range(done, len(mine)):
        j, start, stop = mine[k]
        images, features, logits, (t_model, t_decode, t_inception) = batch(j, start, stop)
        t_inception += timed(device, stats.update, features, logits, start)[1]
        if samples is not None:
            samples[start:stop] = to_uint8(images)
        seconds = dict(transformer=seconds["transformer"] + t_model, decoder=seconds["decoder"] + t_decode,
                       inception=seconds["inception"] + t_inception,
                       wall=wall_before + time.perf_counter() - wall_start)
        if (k + 1) % args.save_every == 0 or k + 1 == len(mine):
            if samples is not None:
                samples.flush()
            state.save(stats, k + 1, seconds)
        bar.update(progress(k + 1) - bar.n)
    bar.close()
    return seconds


def _remove_state(args, state, rank, world):
    """Delete the partial sums once the outputs are written (and --state-dir when it is left empty)."""
    _barrier(world)
    state.remove()
    _barrier(world)
    if rank == 0 and os.path.isdir(args.state_dir) and not os.listdir(args.state_dir):
        os.rmdir(args.state_dir)


def _device_name(device):
    return torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")


def _finish(args, stats, reference, labels, timing, hashes, info):
    """Rank 0: the numbers, printed and written to --json, --save-stats and --save-npz."""
    if stats.count != args.num:
        raise RuntimeError(f"enat.evaluate: {stats.count} of {args.num} samples were measured")
    mu, sigma = stats.mean_cov()
    fid = E.frechet_distance(mu, sigma, *reference) if reference is not None else None
    is_mean, is_std = stats.inception_score()
    transformer, decoder, inception, wall = timing
    n = args.num
    rates = {k: n / s if s > 0 else None for k, s in (("transformer", transformer), ("decoder", decoder),
                                                     ("inception", inception), ("total", wall))}
    result = dict(fid=fid, is_mean=is_mean, is_std=is_std, num=n)
    if args.save_stats:
        E.save_reference(args.save_stats, mu, sigma)
    if args.save_npz:
        _pack_samples(args.save_npz, labels.numpy())
    if args.json:
        record = dict(result, is_splits=stats.splits, settings=vars(args), resolved=info, sha256=hashes,
                      versions=_versions(), seconds=dict(zip(("transformer", "decoder", "inception", "total"), timing)),
                      images_per_s=rates, inception_share=inception / (transformer + decoder) if transformer + decoder
                      else None)
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        tmp = f"{args.json}.tmp"
        with open(tmp, "w") as f:
            json.dump(record, f, indent=1)
        os.replace(tmp, args.json)

    def rate(k):
        return f"{rates[k]:.2f} images/s" if rates[k] else "n/a"

    procs = f", {info['processes']} processes" if info["processes"] > 1 else ""
    print(f"{n} samples, {info['cfg_name']} at {info['resolution']} px, {info['sampler']['steps']} steps on "
          f"{info['device']} ({info['dtype'].removeprefix('torch.')}{procs}):")
    print(f"  FID {fid:.4f}" if fid is not None else "  FID not computed (no --reference)")
    print(f"  IS  {is_mean:.4f} +- {is_std:.4f} ({stats.splits} splits)")
    print(f"  transformer (enat.sample) {transformer:.3f} s  {rate('transformer')}")
    print(f"  VQ decoder                {decoder:.3f} s  {rate('decoder')}")
    print(f"  Inception + statistics    {inception:.3f} s  {rate('inception')}")
    print(f"  all (wall)                {wall:.3f} s  {rate('total')}")
    for flag, path in (("--save-stats", args.save_stats), ("--save-npz", args.save_npz), ("--json", args.json)):
        if path:
            print(f"wrote {path} ({flag})")
    return result


def _image_files(root):
    """The image files under `root` (by extension, as pytorch-fid picks them), sorted."""
    if not os.path.isdir(root):
        raise CommandError(f"--images: folder not found: {root!r}")
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        files += [os.path.join(dirpath, f) for f in sorted(filenames)
                  if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)]
    if len(files) < 2:
        raise CommandError(f"--images: {root!r} holds {len(files)} image files ({', '.join(IMAGE_EXTENSIONS)}); "
                           "statistics need two or more")
    return files


def run_stats(args):
    """python -m enat.evaluate stats: mu and sigma of a folder's images to --out."""

    if args.batch_size < 1 or args.workers < 0 or args.resolution < 1:
        raise CommandError(f"--batch-size and --resolution must be >= 1 and --workers >= 0, got {args.batch_size}, "
                           f"{args.resolution}, {args.workers}")
    _require_inception(args)
    device = torch.device(args.device or default_device())
    files = _image_files(args.images)
    inception = _inception(args, device)
    stats = E.FeatureStats(len(files), device=device)
    unreadable = []
    with progress_bar("enat.evaluate stats", len(files), "img", enabled=not args.no_progress) as bar:
        for items in image_batches([(f, 0) for f in files], args.resolution, args.batch_size, args.workers):
            unreadable += [(files[i], error) for i, _, _, error in items if error is not None]
            if not unreadable:  # after the first unreadable file only the listing goes on
                pixels = torch.from_numpy(np.stack([arr for _, _, arr, _ in items])).to(device)
                stats.update(*inception(pixels.permute(0, 3, 1, 2).float().div_(255)), start=items[0][0])
            bar.update(len(items))
    if unreadable:
        listing = "\n".join(f"  {path}: {error}" for path, error in unreadable[:20])
        more = f"\n  ... and {len(unreadable) - 20} more" if len(unreadable) > 20 else ""
        raise CommandError(f"--images: {len(unreadable)} of {len(files)} image files cannot be read (nothing "
                           f"written; remove or fix them):\n{listing}{more}")
    mu, sigma = stats.mean_cov()
    E.save_reference(args.out, mu, sigma)
    print(f"wrote {args.out}: mu and sigma of {len(files)} images at {args.resolution} px ({E.FEATURES} features)")
    return mu, sigma


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    stats = bool(argv) and argv[0] == "stats"
    prog = "python -m enat.evaluate" + (" stats" if stats else "")
    args = (build_stats_parser().parse_args(argv[1:]) if stats else build_parser().parse_args(argv))
    return run_command(prog, run_stats if stats else run, args)


if __name__ == "__main__":
    sys.exit(main())

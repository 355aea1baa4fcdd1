"""What the `python -m enat.*` commands share: devices and dtypes, the model, sampler and tokenizer flags
and the old spellings of renamed flags, loading ENAT (the paper's checkpoints and enat.train's) and the
VQGAN, torch.distributed set-up, reading image folders (ADM's crop, decoding workers), the seeded batches split over processes, and
the error handling of a command's main."""

import argparse
import hashlib
import math
import os
import sys
import time
import warnings

import numpy as np
import torch
import torch.distributed as dist

from . import vq
from .checkpoint import load_official
from .config import ENATConfig, config
from .model import ENAT
from .sampler import sample

MODELS = ("ENAT-S", "ENAT-B", "ENAT-L", "tiny")
DEFAULT_MODEL, DEFAULT_RESOLUTION = "ENAT-L", 256
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ENAT_SOURCE = ("the ENAT checkpoints released with the paper (ENAT, NeurIPS 2024, arXiv 2411.06959; e.g. "
               "nnet_ema.pth of ENAT-S/B/L at 256 or 512 px), or checkpoints/latest.pt of python -m enat.train")
SEED_STRIDE = 1_000_003
SHAPE_FIELDS = ("depth_enc", "depth_dec", "width", "heads", "resolution", "vocab_size", "num_classes")


class CommandError(Exception):
    """A problem with the command's arguments or files: printed as one message, exit status 2."""


def default_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_workers():
    """Image-decoding processes: the CPUs this process may run on (os.cpu_count() where that is unknown),
    at most 4."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return min(4, cpus or 1)


def add_workers_arg(parser):
    parser.add_argument("--workers", type=int, default=default_workers(),
                        help="image decoding processes (0: in this one; default: this machine's CPUs, at most 4: "
                             "%(default)s here)")


def center_crop_arr(image, size):
    """ADM's preprocessing (docs/VQ.md): halve with a box filter while the short side is >= 2 size, resize
    the short side to `size` (bicubic), cut the centred size x size square. PIL image -> uint8 (size, size, 3)."""
    from PIL import Image

    image = image.convert("RGB")
    while min(*image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = size / min(*image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top:top + size, left:left + size]


class _ImageFiles(torch.utils.data.Dataset):
    """Item i: (i, label, uint8 (size, size, 3) by center_crop_arr or None, None or why the file cannot be read)."""

    def __init__(self, files, size):
        self.files, self.size = files, size

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        from PIL import Image

        path, label = self.files[i]
        try:
            with Image.open(path) as image:
                return i, label, center_crop_arr(image, self.size), None
        except Exception as e:  # not an image, truncated, unsupported mode: reported at the end
            return i, label, None, f"{type(e).__name__}: {e}"


def _collate(items):
    return items


def image_batches(files, size, batch_size, workers):
    """The images of `files` ([(path, label)]) in batches: lists of _ImageFiles items, decoded by `workers`
    processes (0: this one)."""
    return torch.utils.data.DataLoader(_ImageFiles(files, size), batch_size=batch_size, num_workers=workers,
                                       collate_fn=_collate)


def progress_bar(desc, total, unit, *, initial=0, enabled=True):
    """A tqdm progress bar on stderr (a no-op one when not `enabled`)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=not enabled)


class _OldSpelling(argparse.Action):
    """A renamed flag's old spelling: stores into the new flag's dest and warns (FutureWarning) that it
    is deprecated, naming the replacement."""

    def __init__(self, option_strings, dest, replacement, **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.replacement = replacement

    def __call__(self, parser, namespace, values, option_string=None):
        # attributed to the command (prog:0), not to argparse's code
        warnings.warn_explicit(f"{option_string} is deprecated: use {self.replacement}", FutureWarning,
                               parser.prog, 0)
        setattr(namespace, self.dest, self.const if self.nargs == 0 else values)


def add_old_spelling(parser, old, new, dest, *, type=None, const=None):
    """Accept `old` (hidden from --help) as `new`: the value (`type`), or with `const` a switch that
    stores const (`--bf16` for `--dtype bf16`)."""
    value = dict(type=type) if const is None else dict(nargs=0, const=const)
    parser.add_argument(old, dest=dest, action=_OldSpelling, replacement=new if const is None else f"{new} {const}",
                        default=argparse.SUPPRESS, help=argparse.SUPPRESS, **value)


def run_command(prog, run, args):
    """run(args) as a command's main: 0, or 2 with `prog: error: message` on stderr for a CommandError."""
    try:
        run(args)
    except CommandError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    return 0


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
    """The seed of batch j's generator."""
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


def to_uint8(images):
    """(B, 3, H, W) float in [0, 1] -> uint8 numpy (B, H, W, 3)."""
    return (images.float() * 255).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def check_file(path, what, source, flag):
    if path is None:
        raise CommandError(f"{flag} is required (the {what}: {source}), or pass --random-weights")
    if not os.path.isfile(path):
        raise CommandError(f"{what} not found: {path!r} ({flag}). It is {source}.")


def sha256(path, chunk=1 << 24):
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device, fn, *args, **kwargs):
    """(fn(*args, **kwargs), seconds it took), the device synchronised before and after."""
    sync(device)
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    sync(device)
    return out, time.perf_counter() - start


def sample_batch(model, labels, seed, j, settings):
    """(ids (B, L), seconds): enat.sample of batch j, drawn from its own generator (batch_seed(seed, j))."""
    generator = torch.Generator(labels.device).manual_seed(batch_seed(seed, j))
    return timed(labels.device, sample, model, labels, generator=generator, **settings)


def init_distributed(device_arg):
    """(rank, world, device): torch.distributed only when WORLD_SIZE > 1 (gloo on CPU, nccl on GPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = torch.device(device_arg or default_device())
    if world <= 1:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world, device


class Distributed:
    """enat.train's processes: the process group when WORLD_SIZE > 1 (torchrun sets it), else one
    process; the device is --device, else the local rank's GPU if there is one, else the CPU."""

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


def add_model_args(parser):
    """The ENAT and sampler flags of enat.generate and enat.evaluate."""
    parser.add_argument("--model", choices=MODELS, default=None,
                        help=f"ENAT size (default: {DEFAULT_MODEL}; a training checkpoint names its own)")
    parser.add_argument("--checkpoint", default=None, help=f"ENAT weights: {ENAT_SOURCE}")
    parser.add_argument("--resolution", type=int, default=None,
                        help=f"256 or 512 (tiny: any multiple of 16; default: {DEFAULT_RESOLUTION}, or the "
                             "training checkpoint's)")
    parser.add_argument("--steps", type=int, default=8, help="sampling steps (default: 8)")
    parser.add_argument("--cfg-scale", type=float, default=None,
                        help="guidance scale (default: the model's for the resolution)")
    parser.add_argument("--mask-temp", type=float, default=None, help="mask temperature (default: the model's)")
    parser.add_argument("--samp-temp", type=float, default=None, help="sampling temperature (default: the model's)")
    parser.add_argument("--no-reuse", action="store_true", help="ENAT without feature reuse")
    parser.add_argument("--seed", type=int, default=0)


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


def model_dtype(args, device):
    """--dtype, by default bf16 on a GPU and fp32 elsewhere."""
    return DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]


def sampler_settings(args, cfg):
    """enat.sample's keyword arguments: the flags, else the model config's settings."""
    if args.steps < 1:
        raise CommandError(f"--steps must be >= 1, got {args.steps}")
    return dict(steps=args.steps, reuse=not args.no_reuse,
                cfg_scale=cfg.cfg_scale if args.cfg_scale is None else args.cfg_scale,
                mask_temp=cfg.mask_temp if args.mask_temp is None else args.mask_temp,
                samp_temp=cfg.samp_temp if args.samp_temp is None else args.samp_temp)


def _read_checkpoint(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # not a torch file, truncated, or holding objects other than tensors and plain data
        raise CommandError(f"{path!r} (--checkpoint) cannot be read as a PyTorch checkpoint: "
                           f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None


def _training_config(state, args):
    """The ENATConfig of an enat.train checkpoint; --model and --resolution, when given, must describe it."""
    try:
        cfg = ENATConfig(**state["config"])
    except (TypeError, ValueError) as e:
        raise CommandError(f"{args.checkpoint!r} (--checkpoint): its 'config' is not an ENATConfig: {e}") from None
    wrong = []
    if args.resolution is not None and args.resolution != cfg.resolution:
        wrong.append(f"--resolution {args.resolution}, the checkpoint's {cfg.resolution}")
    if args.model is not None:
        named = model_config(args.model, DEFAULT_RESOLUTION)
        wrong += [f"--model {args.model}'s {f} {getattr(named, f)}, the checkpoint's {getattr(cfg, f)}"
                  for f in SHAPE_FIELDS if f != "resolution" and getattr(named, f) != getattr(cfg, f)]
    if wrong:
        raise CommandError(f"the flags contradict the training checkpoint {args.checkpoint!r} ({'; '.join(wrong)}): "
                           "leave out --model and --resolution, a training checkpoint carries its configuration")
    return cfg


def load_model(args):
    """(ENAT in eval mode on the CPU, its config) for the flags: --random-weights (PyTorch's initialisation
    from --seed), a state dict of the paper's (--model / --resolution give the sizes) or enat.train's
    checkpoint (a dict with 'config' and 'ema': its config and EMA weights)."""
    if args.random_weights:
        if args.checkpoint is not None:
            raise CommandError("--checkpoint and --random-weights exclude each other (random weights would "
                               f"replace {args.checkpoint!r}): pass one of them")
        cfg = model_config(args.model or DEFAULT_MODEL, args.resolution or DEFAULT_RESOLUTION)
        torch.manual_seed(args.seed)
        return ENAT(cfg).eval(), cfg
    check_file(args.checkpoint, "ENAT checkpoint", ENAT_SOURCE, "--checkpoint")
    state = _read_checkpoint(args.checkpoint)
    if isinstance(state, dict) and isinstance(state.get("config"), dict) and isinstance(state.get("ema"), dict):
        cfg, weights = _training_config(state, args), state["ema"]
    else:
        cfg, weights = model_config(args.model or DEFAULT_MODEL, args.resolution or DEFAULT_RESOLUTION), state
    try:
        return load_official(weights, cfg), cfg
    except (ValueError, TypeError) as e:
        raise CommandError(f"{args.checkpoint}: {e}") from None


def load_vq(args, device, dtype, n_embed=None):
    """The VQGAN of --vq-checkpoint (or, with --random-weights, PyTorch's initialisation from seed 0) at
    --vq-config's sizes (n_embed: another codebook size, for random weights only)."""
    cfg = dict(vq.CONFIGS[args.vq_config])
    if args.random_weights:  # the same weights every run: PyTorch's initialisation from seed 0
        if args.vq_checkpoint is not None:
            raise CommandError("--vq-checkpoint and --random-weights exclude each other (random weights would "
                               f"replace {args.vq_checkpoint!r}): pass one of them")
        cfg["n_embed"] = n_embed or cfg["n_embed"]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = vq.VQGAN(**cfg).eval()
    else:
        if n_embed is not None and n_embed != cfg["n_embed"]:
            raise CommandError(f"the model's vocabulary has {n_embed} codes, the VQGAN tokenizer's "
                               f"{cfg['n_embed']}: its token ids cannot be decoded into images "
                               "(python -m enat.generate --save-ids writes the ids alone)")
        check_file(args.vq_checkpoint, "VQGAN checkpoint", f"the paper's tokenizer, {vq.CHECKPOINT_NAME} "
                   f"({vq.CHECKPOINT_SOURCE})", "--vq-checkpoint")
        try:
            model = vq.load_vqgan(args.vq_checkpoint, **cfg)
        except (ValueError, TypeError) as e:
            raise CommandError(f"{args.vq_checkpoint}: {e}") from None
    return model.to(device, dtype)


def check_vq_grid(vqgan, cfg):
    if vqgan.downsample * math.isqrt(cfg.seq_len) != cfg.resolution:
        raise CommandError(f"the VQGAN's {vqgan.downsample}x grid does not give {cfg.resolution} px")


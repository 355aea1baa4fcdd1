"""What the `python -m enat.*` commands share: devices and dtypes, the model, sampler and tokenizer flags,
loading ENAT (the paper's checkpoints and enat.train's) and the VQGAN, torch.distributed set-up, and the
seeded batches split over processes."""

import hashlib
import math
import os
import time

import torch

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
    import torch.distributed as dist

    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world, device


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


"""The VQGAN tokenizer of ENAT's ImageNet models (the MaskGIT/MAGE tokenizer, `vqgan_jax_strongaug.ckpt`),
as specified in docs/VQ.md: images <-> token ids.

    vqgan = enat.vq.load_vqgan("vqgan_jax_strongaug.ckpt").to("cuda", torch.bfloat16)
    images = vqgan.decode(ids)       # ids (B, L), L = 256 or 1024 -> (B, 3, 256 or 512, ...) in [0, 1]
    ids = vqgan.encode(images)       # (B, 3, H, W) in [0, 1] -> (B, H/16 * W/16) int64, row-major

Parameter names are the checkpoint's (`encoder.*`, `decoder.*`, `quantize.embedding.weight`). The module
keeps its conv weights in channels_last memory format and feeds the convolutions channels_last
activations, so after `.to(device, torch.bfloat16 or torch.float16)` a GPU runs them as cuDNN NHWC
half-precision convolutions; the nearest-codebook-row search runs in float32 at least. `decode` reads
nothing back from the device (its shapes follow from the input's shape only).
"""

import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from enat_kernels import checks as _checks

from .checkpoint import load_strict, state_dict_of

CHECKPOINT_NAME = "vqgan_jax_strongaug.ckpt"
CHECKPOINT_SOURCE = ("the tokenizer released with the paper: the MaskGIT VQGAN converted to PyTorch, distributed "
                     "as vqgan_jax_strongaug.ckpt with MAGE (github.com/LTH14/mage) and used by ENAT's release")

# The paper's tokenizer (docs/VQ.md, "Configuration").
PAPER_CONFIG = dict(ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, z_channels=256, n_embed=1024,
                    in_channels=3, out_channels=3)
# A narrow tokenizer of the same shape (five levels, 16x, 1024 codes) for tests and for checking the
# pipeline on a CPU: about 2 GMACs to decode a 256 px image instead of 93.
TINY_CONFIG = dict(ch=32, ch_mult=(1, 1, 2, 2, 2), num_res_blocks=1, z_channels=64, n_embed=1024,
                   in_channels=3, out_channels=3)
CONFIGS = {"paper": PAPER_CONFIG, "tiny": TINY_CONFIG}

GROUPS = 32
EPS = 1e-6
UNUSED_PREFIXES = ("loss.",)  # the training losses' networks, if a checkpoint carries them


def _norm(channels):
    return nn.GroupNorm(GROUPS, channels, eps=EPS, affine=True)


class ResnetBlock(nn.Module):
    """docs/VQ.md: bias-free 3x3 convs; with in != out the 1x1 `nin_shortcut` is applied to h, not x."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.norm1 = _norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = _norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.nin_shortcut = (nn.Conv2d(out_channels, out_channels, 1, bias=False)
                             if in_channels != out_channels else None)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if self.nin_shortcut is not None:
            return self.nin_shortcut(h) + h  # the ported weights' quirk: x does not reach the output
        return x + h


class _Mid(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x):
        return self.block_2(self.block_1(x))


class _Level(nn.Module):
    def __init__(self, in_channels, out_channels, num_res_blocks):
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(in_channels if j == 0 else out_channels, out_channels)
                                   for j in range(num_res_blocks))


class _Upsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=True)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Encoder(nn.Module):
    """(B, in_channels, H, W) -> z (B, z_channels, H / 2^(levels-1), W / 2^(levels-1))."""

    def __init__(self, ch, ch_mult, num_res_blocks, z_channels, in_channels, **_):
        super().__init__()
        widths = [ch * m for m in ch_mult]
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1, bias=False)
        self.down = nn.ModuleList(_Level(([ch] + widths)[i], widths[i], num_res_blocks) for i in range(len(widths)))
        self.mid = _Mid(widths[-1])
        self.norm_out = _norm(widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], z_channels, 1, bias=True)

    def forward(self, x):
        h = self.conv_in(x)
        for i, level in enumerate(self.down):
            for block in level.block:
                h = block(h)
            if i != len(self.down) - 1:
                h = F.avg_pool2d(h, 2, 2)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """z (B, z_channels, h, w) -> (B, out_channels, h 2^(levels-1), w 2^(levels-1)), unclamped.
    `up` is indexed by level: up[-1] runs first, up[0] last."""

    def __init__(self, ch, ch_mult, num_res_blocks, z_channels, out_channels, **_):
        super().__init__()
        widths = [ch * m for m in ch_mult]
        self.conv_in = nn.Conv2d(z_channels, widths[-1], 3, padding=1, bias=True)
        self.mid = _Mid(widths[-1])
        up = []
        for i in range(len(widths)):
            level = _Level((widths + [widths[-1]])[i + 1], widths[i], num_res_blocks)
            if i != 0:
                level.upsample = _Upsample(widths[i])
            up.append(level)
        self.up = nn.ModuleList(up)
        self.norm_out = _norm(widths[0])
        self.conv_out = nn.Conv2d(widths[0], out_channels, 3, padding=1, bias=True)

    def forward(self, z):
        h = self.mid(self.conv_in(z))
        for i in reversed(range(len(self.up))):
            level = self.up[i]
            for block in level.block:
                h = block(h)
            if i != 0:
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    """The codebook `embedding` (n_embed, dim) and its nearest-row rule."""

    def __init__(self, n_embed, dim):
        super().__init__()
        self.embedding = nn.Embedding(n_embed, dim)

    def forward(self, z):
        """z (B, dim, h, w) -> ids (B, h*w) int64: argmin over rows e of |z|^2 + |e|^2 - 2 z.e, in float32
        at least (first index on ties)."""
        B, C, h, w = z.shape
        dtype = torch.promote_types(z.dtype, torch.float32)
        flat = z.permute(0, 2, 3, 1).reshape(B * h * w, C).to(dtype)
        codebook = self.embedding.weight.to(dtype)
        dist = (flat.square().sum(1, keepdim=True) + codebook.square().sum(1)).addmm_(flat, codebook.t(), alpha=-2)
        return dist.argmin(dim=1).view(B, h * w)


class VQGAN(nn.Module):
    """The tokenizer of docs/VQ.md: `encoder`, `quantize` (the codebook), `decoder`. The defaults are the
    paper's configuration; other sizes (a multiple of 32 for every width, z_channels = codebook dim) serve
    tests. Conv weights are kept channels_last (state_dict keys and shapes are unaffected)."""

    def __init__(self, *, ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, z_channels=256, n_embed=1024,
                 in_channels=3, out_channels=3):
        super().__init__()
        ch_mult = tuple(ch_mult)
        for name, value in (("ch", ch), ("num_res_blocks", num_res_blocks), ("z_channels", z_channels),
                            ("n_embed", n_embed), ("in_channels", in_channels), ("out_channels", out_channels)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"VQGAN: {name} must be a positive int, got {value!r}")
        if not ch_mult or any(isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in ch_mult):
            raise ValueError(f"VQGAN: ch_mult must be a non-empty sequence of positive ints, got {ch_mult!r}")
        if ch % GROUPS:
            raise ValueError(f"VQGAN: ch must be a multiple of {GROUPS} (GroupNorm groups), got {ch}")
        self.config = dict(ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks, z_channels=z_channels,
                           n_embed=n_embed, in_channels=in_channels, out_channels=out_channels)
        self.encoder = Encoder(**self.config)
        self.decoder = Decoder(**self.config)
        self.quantize = VectorQuantizer(n_embed, z_channels)
        self.to(memory_format=torch.channels_last)  # 4-D weights only; .to(device, dtype) keeps the strides

    @property
    def downsample(self):
        """Pixels per token side (16 for the paper's tokenizer)."""
        return 2 ** (len(self.config["ch_mult"]) - 1)

    @property
    def n_embed(self):
        return self.config["n_embed"]

    def _param(self):
        return self.quantize.embedding.weight

    def encode(self, images):
        """images: float (B, in_channels, H, W) in [0, 1], H and W multiples of `downsample`, on the module's
        device -> ids (B, H/16 * W/16) int64, row-major over the token grid."""
        weight = self._param()
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a tensor (B, {self.config['in_channels']}, H, W), "
                            f"got {type(images).__name__}")
        if not images.dtype.is_floating_point:
            raise TypeError(f"images must be a float tensor with values in [0, 1] (uint8 pixels: divide by 255), "
                            f"got {images.dtype}")
        if images.dim() != 4:
            raise ValueError(f"images must be 4-D (B, {self.config['in_channels']}, H, W), got shape "
                             f"{tuple(images.shape)}")
        B, C, H, W = images.shape
        if C != self.config["in_channels"]:
            raise ValueError(f"images must have {self.config['in_channels']} channels (RGB, dim 1), got shape "
                             f"{tuple(images.shape)}")
        f = self.downsample
        if B < 1 or H < f or W < f or H % f or W % f:
            raise ValueError(f"images: batch must be >= 1 and H, W positive multiples of {f}, got shape "
                             f"{tuple(images.shape)}")
        if images.device != weight.device:
            raise ValueError(f"images must be on the module's device ({weight.device}), got {images.device}")
        x = images.to(weight.dtype).contiguous(memory_format=torch.channels_last)
        return self.quantize(self.encoder(x))

    def decode(self, ids):
        """ids: integer (B, L) on the module's device, L a square (256 -> 256 px, 1024 -> 512 px), values
        in [0, n_embed) (checked for CPU tensors; on a GPU only with ENAT_KERNELS_DEBUG=1, as that reads
        back) -> images (B, out_channels, sqrt(L) 16, sqrt(L) 16) clamped to [0, 1], in the module's dtype
        (channels_last strides)."""
        weight = self._param()
        if not isinstance(ids, torch.Tensor):
            raise TypeError(f"ids must be a tensor (B, L) of token ids, got {type(ids).__name__}")
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise TypeError(f"ids must be an integer tensor (int64 or int32), got {ids.dtype}")
        if ids.dim() != 2:
            raise ValueError(f"ids must be 2-D (B, L), got shape {tuple(ids.shape)}")
        B, L = ids.shape
        side = math.isqrt(L)
        if B < 1 or L < 1 or side * side != L:
            raise ValueError(f"ids (B, L) must have B >= 1 and L a square number of tokens (a square grid: 256 "
                             f"for 256 px, 1024 for 512 px), got shape {tuple(ids.shape)}")
        if ids.device != weight.device:
            raise ValueError(f"ids must be on the module's device ({weight.device}), got {ids.device}")
        if _checks.values_checked(ids):
            lo, hi = torch.stack(torch.aminmax(ids)).tolist()
            if lo < 0 or hi >= self.n_embed:
                raise ValueError(f"ids must be token ids in [0, {self.n_embed}), got values in [{lo}, {hi}] "
                                 f"(the [MASK] id {self.n_embed} means generation did not finish)")
        z = F.embedding(ids.long(), weight).view(B, side, side, -1).permute(0, 3, 1, 2)  # channels_last strides
        return self.decoder(z).clamp_(0, 1)

    def forward(self, ids):
        return self.decode(ids)


def decoder_macs(resolution, **config):
    """Multiply-accumulates of the decoder's convolutions for one square image of `resolution` px (what
    torch.utils.flop_counter counts, halved; norms, activations and upsampling copies cost nothing):
    93.27e9 at 256 px and 373.1e9 at 512 px for the paper's tokenizer (`config` overrides its sizes)."""
    cfg = {**PAPER_CONFIG, **config}
    widths = [cfg["ch"] * m for m in cfg["ch_mult"]]
    f = 2 ** (len(widths) - 1)
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < f or resolution % f:
        raise ValueError(f"decoder_macs: resolution must be a positive multiple of {f}, got {resolution!r}")
    side = resolution // f

    def conv(c_in, c_out, k, s):
        return c_in * c_out * k * k * s * s

    def block(c_in, c_out, s):
        return conv(c_in, c_out, 3, s) + conv(c_out, c_out, 3, s) + (conv(c_out, c_out, 1, s) if c_in != c_out else 0)

    macs = conv(cfg["z_channels"], widths[-1], 3, side) + 2 * block(widths[-1], widths[-1], side)
    c = widths[-1]
    for i in reversed(range(len(widths))):
        for _ in range(cfg["num_res_blocks"]):
            macs += block(c, widths[i], side)
            c = widths[i]
        if i != 0:
            side *= 2
            macs += conv(c, c, 3, side)
    return macs + conv(c, cfg["out_channels"], 3, side)


def _read(path):
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"VQGAN checkpoint not found: {os.fspath(path)!r}. Expected the paper's tokenizer file "
            f"{CHECKPOINT_NAME} ({CHECKPOINT_SOURCE}); pass its path. "
            f"(python -m enat.generate --random-weights runs without checkpoints.)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickled non-tensor objects, a truncated download, not a torch file
        raise ValueError(f"could not read the VQGAN checkpoint {os.fspath(path)!r} with torch.load(weights_only="
                         f"True): {type(e).__name__}: {e}. If the file holds trusted pickled objects, load it "
                         f"yourself (torch.load(path, weights_only=False)) and pass the state dict.") from e


def load_vqgan(state_dict_or_path, **config):
    """A VQGAN in eval mode holding the weights of the paper's tokenizer checkpoint (a state dict, or the
    path of `vqgan_jax_strongaug.ckpt`); weights under a "state_dict" entry and a `module.` prefix are
    accepted and `loss.*` entries dropped (docs/VQ.md). Keys are checked strictly: a mismatch raises a
    ValueError listing the missing, unexpected and wrongly shaped keys. `config` overrides the paper's
    sizes (VQGAN's arguments)."""
    model = VQGAN(**config)
    state = state_dict_of(state_dict_or_path, drop_prefixes=UNUSED_PREFIXES, read=_read)
    return load_strict(model, state, f"the VQGAN tokenizer ({model.config})")
